"""The PixArt-Sigma family plugin, on a tiny PixArt-Sigma pipeline folder built here (random weights, nothing
downloaded), checked as the built-in families are: its text embeddings against the pipeline's ``encode_prompt``,
its sampler against ``PixArtSigmaPipeline``, every phase kind of its recipe, the cache, the diffusers export
loaded with ``from_pretrained`` and sampled by the pipeline, the LoRA and ComfyUI refusals, and ``plan`` offline.
DDP and FSDP2 (two processes) are in the slow run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from support import ROOT, fast_overrides, run_cli

PLUGIN = Path(__file__).resolve().parents[1]
RECIPE = PLUGIN / "recipes" / "lightning.yaml"
PROMPTS = ["A red cat ", "a small blue square on the left"]


def make_pixart(out: Path, seed: int = 0) -> Path:
    """PixArt-Sigma's layout and classes: a 2-block DiT (2 heads of 8, cross-attention to a 32-wide T5, learned
    variance: 8 output channels), the SD VAE's shape (4 channels, 8 pixels per latent), linear betas, epsilon."""
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from tiny_families import make_t5, make_t5_tokenizer, make_vae

    torch.manual_seed(seed)
    tokenizer = make_t5_tokenizer()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=make_t5(tokenizer, 32), vae=make_vae(4, 0.18215),
        transformer=PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, caption_channels=32, sample_size=4, patch_size=2, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        ),
        scheduler=DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                              beta_schedule="linear", prediction_type="epsilon"),
    )
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_pixart(tmp_path_factory):
    return make_pixart(tmp_path_factory.mktemp("pixart") / "pipeline")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(PROMPTS[i % 2])
    return folder


@pytest.fixture(scope="module")
def family(tiny_pixart):
    from diffusers import PixArtSigmaPipeline

    from lightning_distill import CODECS, TEACHERS
    from lightning_distill.config.fields import validate

    def build(registry, name):
        cls = registry.get(name)
        return cls(validate({"pretrained": str(tiny_pixart)}, cls.Config))

    return build(TEACHERS, "pixart"), build(CODECS, "pixart"), PixArtSigmaPipeline.from_pretrained(str(tiny_pixart))


def _overrides(folder, images, *extra):
    from lightning_distill.config.recipe import load_recipe

    args = fast_overrides(load_recipe(RECIPE).resolved, {"pipeline": folder, "images": images}, lr=1e-3)
    return [*args, "data.resolution=32", *extra]


@pytest.fixture(scope="module")
def run(tiny_pixart, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "pixart"
    result = run_cli("train", str(RECIPE), "--out", str(out), *_overrides(tiny_pixart, images), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "x0_convert" in result.stderr  # linear betas: the recipe's 1-step conversion is warned about
    return out


def test_the_plugin_registers_through_its_entry_point():
    from importlib.metadata import entry_points

    assert "lightning_distill_pixart" in [e.value for e in entry_points(group="lightning_distill.plugins")]
    result = run_cli("components", "teacher")
    assert result.returncode == 0 and "pixart" in result.stdout


def test_the_codec_gives_what_the_pipelines_encode_prompt_gives(family):
    """Text and mask of the prompts and of guidance's null (the empty caption) equal ``encode_prompt``'s."""
    from lightning_distill.codecs.base import null_conditioning

    _, codec, pipe = family
    ours = codec.encode_text(PROMPTS)
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                               negative_prompt="", clean_caption=False)
    assert ours["text"].shape == (2, 300, 32) and torch.allclose(ours["text"], embeds, atol=1e-6)
    assert torch.equal(ours["mask"], mask.float()) and 0 < mask.sum() < mask.numel()
    null = null_conditioning(codec, 32, 32, "cpu")
    assert set(null) == {"text", "mask"}  # the mask is the empty caption's, not the prompt's
    assert torch.allclose(null["text"], negative[:1], atol=1e-6) and torch.equal(null["mask"], negative_mask[:1].float())


@pytest.mark.parametrize("guidance", [0.0, 4.5])
def test_the_teachers_sampler_matches_the_pipeline(family, guidance):
    """Our Euler sampler over the PixArt teacher (real CFG, masks included) against ``PixArtSigmaPipeline`` with
    the scheduler an export gets (trailing Euler, the folder's betas)."""
    from lightning_distill.codecs.base import null_conditioning
    from lightning_distill.inference.sampler import sample_latents
    from lightning_distill.models.teacher import guided

    teacher, codec, pipe = family
    assert teacher.prediction == "epsilon" and teacher.schedule.alphas_cumprod[-1].sqrt().item() == pytest.approx(0.0064, abs=1e-4)
    pipe.scheduler = teacher.sampling_scheduler("epsilon")
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    null = null_conditioning(codec, 32, 32, "cpu")
    ours = sample_latents(guided(teacher.denoiser, guidance, null), teacher.schedule, "epsilon", noise,
                          codec.encode_text(PROMPTS), 4)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=noise, num_inference_steps=4, guidance_scale=guidance, height=32,
                      width=32, output_type="latent", **teacher.pipeline_call).images
    # a random network's x0 on linear betas reaches hundreds: float32 rounding, relative to the largest value
    assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()


def test_the_discriminator_trunk_keeps_only_parameters_that_learn(family):
    """The ``transformer_blocks`` backbone on PixArt: image-token maps of the first block, and every parameter
    it keeps gets a gradient (the output modulation table, a parameter, is dropped with the output layers)."""
    from lightning_distill import BACKBONES
    from lightning_distill.config.fields import validate

    teacher, codec, _ = family
    cls = BACKBONES.get("transformer_blocks")
    backbone = cls(validate({"blocks": 1}, cls.Config), teacher=teacher)
    assert backbone.denoiser.transformer.scale_shift_table is None
    cond = codec.encode_text(PROMPTS)
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = backbone(x, torch.tensor([500, 20]), cond)
    assert out.shape == (2, 16, 2, 2)
    out.square().mean().backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing and x.grad.abs().sum() > 0


def test_the_recipe_trains_every_phase_kind(run):
    phases = sorted(p.stem.split("-", 1)[1] for p in (run / "phases").glob("*.safetensors"))
    assert phases == sorted(["s32-mse", "s8-cond", "s8-uncond", "s4-cond", "s4-uncond", "s2-cond", "s2-uncond",
                             "s1-x0_convert", "s1-cond", "s1-uncond"])


def test_the_diffusers_export_loads_in_the_pipeline_and_samples_like_our_sampler(run, tmp_path):
    from diffusers import EulerDiscreteScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from lightning_distill.inference.sample import sample_exported, sample_run

    out = tmp_path / "export"
    result = run_cli("export", str(run), "--format", "diffusers", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "lightning_distill.json").read_text())
    assert meta["pipeline_call"] == {"use_resolution_binning": False, "clean_caption": False}
    assert meta["steps"] == 1 and meta["resolution"] == 32
    assert "use_resolution_binning=False" in (out / "README.md").read_text()
    pipe = PixArtSigmaPipeline.from_pretrained(meta["base"], transformer=PixArtTransformer2DModel.from_pretrained(
        str(out / "transformer")), scheduler=EulerDiscreteScheduler.from_pretrained(str(out / "scheduler")))
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.scheduler.config.timestep_spacing == "trailing"
    ours = sample_run(run, PROMPTS, seed=3, size=32)
    theirs = sample_exported(out, PROMPTS, seed=3)  # the export's own resolution
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1 / 255


@pytest.mark.parametrize("fmt", ["lora", "comfyui"])
def test_lora_and_comfyui_exports_are_refused_naming_the_format_that_loads(run, tmp_path, fmt):
    result = run_cli("export", str(run), "--format", fmt, "--out", str(tmp_path / fmt))
    assert result.returncode == 2 and "--format diffusers" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / fmt).exists()


def test_the_cache_keeps_the_mask_and_guidance_trains_from_it_without_the_text_encoder(family, tiny_pixart, images,
                                                                                     tmp_path):
    """The cache holds every entry the codec gives (the mask too) and the empty caption's encoding, which guidance
    needs when a run trains from the cache with the text encoder off (a cache written before it was kept is
    refused at start, naming the fix)."""
    from safetensors.torch import load_file

    from lightning_distill.codecs.base import null_conditioning

    common = [f"codec.pretrained={tiny_pixart}", f"data.root={images}", "data.resolution=32", "train.batch_size=2"]
    result = run_cli("cache", str(RECIPE), "--out", str(tmp_path / "cache"), *common)
    assert result.returncode == 0, result.stderr[-3000:]
    shard = load_file(str(tmp_path / "cache" / "shard-00000.safetensors"))
    assert set(shard) == {"latents", "text", "mask"} and shard["mask"].shape[-1] == 300
    null = load_file(str(tmp_path / "cache" / "null.safetensors"))
    expected = null_conditioning(family[1], 32, 32, "cpu")
    assert set(null) == set(expected) and all(torch.allclose(null[k], expected[k], atol=1e-6) for k in null)
    train = ["train", str(RECIPE), *_overrides(tiny_pixart, images), f"data={{name: cached, root: {tmp_path / 'cache'}}}",
             "codec.text_encoders=false",
             "schedule.stages=[{name: s32, teacher_steps: 4, student_steps: 2, phases: [{kind: mse, steps: 1, guidance: 4.5}]}]"]
    result = run_cli(*train, "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "cache" / "null.safetensors").unlink()
    result = run_cli(*train, "--out", str(tmp_path / "old"))
    assert result.returncode == 2 and "empty caption" in result.stderr and not (tmp_path / "old").exists()


def test_plan_runs_offline_from_the_registered_configs():
    """The recipe names the hub id; with the hub offline, plan reads the configs the plugin registered and the
    codec's declared shapes and bytes (T5-XXL: about 19 GB in float32), and builds nothing."""
    result = run_cli("plan", str(RECIPE), "--json", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)
    phases = {p["phase"]: p for p in plan["phases"]}
    assert "s1-uncond" in phases and "s1-x0_convert" in phases
    assert all(18 < p["parts"]["codec"] < 20 for p in phases.values())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_the_ladder(tiny_pixart, images, tmp_path, strategy):
    args = _overrides(tiny_pixart, images, "fabric.devices=2", f"fabric.strategy={strategy}")
    result = run_cli("train", str(RECIPE), "--out", str(tmp_path / strategy), *args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / strategy / "phases").glob("*.safetensors"))) == 10
