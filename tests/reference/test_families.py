"""SD3- and Flux-shaped transformers as teachers, students and discriminators, on tiny pipeline folders the tests
build: our sampler against the diffusers pipelines (same seed, same steps), the discriminator backbone, the LoRA
rule, and the family recipes through the CLI with export to the family's pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_distill.config.fields import validate
from lightning_distill.config.registry import BACKBONES, CODECS, TEACHERS
from lightning_distill.errors import UserError
from lightning_distill.inference.sampler import sample_latents
from lightning_distill.models.adapters import LoRA
from lightning_distill.models.flux.network import pack, unpack
from lightning_distill.models.noise import FlowMatchSchedule, trailing_sigmas
from lightning_distill.models.teacher import guided
from support import ROOT, fast_overrides, run_cli

PROMPTS = ["a red cat", "a small blue square on the left"]


def _build(registry, name, **fields):
    cls = registry.get(name)
    return cls(validate(fields, cls.Config))


@pytest.fixture(scope="module")
def sd3(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    teacher = _build(TEACHERS, "sd3", pretrained=str(tiny_sd3))
    codec = _build(CODECS, "sd3", pretrained=str(tiny_sd3))
    return teacher, codec, StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))


@pytest.fixture(scope="module")
def flux(tiny_flux):
    from diffusers import FluxPipeline

    teacher = _build(TEACHERS, "flux", pretrained=str(tiny_flux), guidance=3.5)
    codec = _build(CODECS, "flux", pretrained=str(tiny_flux))
    return teacher, codec, FluxPipeline.from_pretrained(str(tiny_flux))


def test_flow_teachers_read_their_schedule_from_the_folder(sd3, flux):
    for teacher, dynamic in ((sd3[0], False), (flux[0], True)):
        assert isinstance(teacher.schedule, FlowMatchSchedule) and teacher.prediction == "flow"
        assert teacher.schedule.config.shift == 3.0 and teacher.schedule.config.use_dynamic_shifting == dynamic
        assert teacher.network_folder == "transformer" and teacher.pipeline_class.endswith("Pipeline")
    assert flux[0].embedded_guidance == 3.5 and sd3[0].embedded_guidance == 0.0


@pytest.mark.parametrize("guidance", [0.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4])
def test_sd3_sampler_matches_the_pipeline(sd3, guidance, steps):
    """Our Euler sampler over the SD3 teacher (real CFG with the empty caption's encoding as the unconditional
    input) against ``StableDiffusion3Pipeline`` at our trailing sigmas."""
    from lightning_distill.codecs.base import null_conditioning

    teacher, codec, pipe = sd3
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = codec.encode_text(PROMPTS)
    null = null_conditioning(codec, 32, 32, "cpu")
    ours = sample_latents(guided(teacher.denoiser, guidance, null), teacher.schedule, "flow", noise, cond, steps)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=noise, num_inference_steps=steps, sigmas=trailing_sigmas(steps),
                      guidance_scale=guidance, height=32, width=32, output_type="latent").images
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("steps", [1, 4])
def test_flux_sampler_matches_the_pipeline(flux, steps):
    """Our sampler over the Flux teacher (packing, ids, embedded guidance, the resolution's dynamic shift) against
    ``FluxPipeline``, which packs the same latents and takes the same sigmas by default."""
    teacher, codec, pipe = flux
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = sample_latents(teacher.denoiser, teacher.schedule, "flow", noise, codec.encode_text(PROMPTS), steps)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=pack(noise), num_inference_steps=steps, guidance_scale=3.5,
                      height=64, width=64, output_type="latent").images
    assert (ours - unpack(theirs, 8, 8)).abs().max() < 1e-4


def test_flux_refuses_classifier_free_guidance(flux):
    teacher, codec, _ = flux
    x = torch.randn(1, 16, 4, 4)
    with pytest.raises(UserError, match="embedded"):
        teacher.predict(x, torch.tensor([999]), codec.encode_text(["a cat"]), guidance=3.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_blocks_backbone_is_a_token_map_that_passes_gradients(family, sd3, flux):
    teacher, codec, _ = {"sd3": sd3, "flux": flux}[family]
    cls = BACKBONES.get("transformer_blocks")
    backbone = cls(cls.Config(blocks=1), teacher=teacher)
    assert backbone.denoiser.transformer is not teacher.denoiser.transformer  # a trainable copy
    assert all(p.requires_grad for p in backbone.parameters())
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    feats = backbone(x, torch.tensor([999, 400]), codec.encode_text(PROMPTS))
    assert feats.shape == (2, backbone.out_channels, 4, 4)
    feats.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the generator learns through it
    # every parameter the trunk keeps learns (none left for DDP to wait on: the last block's text stream is cut)
    assert [n for n, p in backbone.named_parameters() if p.grad is None] == []
    with pytest.raises(UserError, match="blocks"):
        cls(cls.Config(blocks=5), teacher=teacher)


def test_a_family_declares_its_trunk_and_every_parameter_of_the_backbone_then_learns(sd3):
    """The discriminator trunk is the denoiser's to declare (``output_layers``, ``discriminator_trunk``,
    ``trunk_block_limit``), not attribute names of two families: a network with an output modulation of its own
    name leaves no parameter in the backbone that never gets a gradient (what stops DDP); a denoiser without token
    maps is refused with the contract named."""
    import copy

    from torch import nn

    teacher, codec, _ = sd3
    teacher = copy.deepcopy(teacher)
    net = teacher.denoiser.transformer
    net.final_modulation = nn.Linear(4, 4)  # a family's own output layer, unknown to the built-in names
    cls = BACKBONES.get("transformer_blocks")
    x, t, cond = torch.randn(2, 16, 8, 8), torch.tensor([999, 400]), codec.encode_text(PROMPTS)

    def unused(backbone):
        backbone.zero_grad()
        backbone(x, t, cond).square().mean().backward()
        return sorted(n for n, p in backbone.named_parameters() if p.grad is None)

    assert any("final_modulation" in n for n in unused(cls(cls.Config(blocks=1), teacher=teacher)))
    teacher.denoiser.output_layers = ("norm_out", "proj_out", "final_modulation")
    assert unused(cls(cls.Config(blocks=1), teacher=teacher)) == []
    teacher.denoiser.trunk_block_limit = lambda: 2  # a family whose last joint block gives tokens on
    assert cls(cls.Config(blocks=2), teacher=teacher).blocks == 2

    class NoMaps(nn.Module):
        def forward(self, x, t, cond):
            return x

    teacher.denoiser = NoMaps()
    for name in ("transformer_blocks", "frozen_features"):
        backbone = BACKBONES.get(name)
        with pytest.raises(UserError, match="NoMaps lacks token_maps.*lightning_distill.TransformerDenoiser"):
            backbone(backbone.Config(), teacher=teacher)


def test_a_transformer_family_on_a_discrete_schedule_subclasses_the_public_teacher(tiny_sd3):
    """A transformer trained on betas (epsilon prediction), written against the package's public names only:
    the loading, the schedule check, the prediction type and the export's trailing Euler scheduler are the
    teacher's, not the family's to redo."""
    from diffusers import EulerDiscreteScheduler

    from lightning_distill import TransformerTeacher
    from lightning_distill.models.noise import NoiseSchedule
    from lightning_distill.models.sd3.network import SD3Denoiser

    class DiscreteSD3(TransformerTeacher):
        network_class = "SD3Transformer2DModel"
        flow_matching = False

        def make_denoiser(self, net, schedule, config):
            return SD3Denoiser(net, schedule)

    with pytest.raises(UserError, match="must be a discrete"):  # the folder's scheduler is flow matching
        DiscreteSD3(validate({"pretrained": str(tiny_sd3)}, DiscreteSD3.Config))
    teacher = DiscreteSD3(validate({"pretrained": str(tiny_sd3), "noise_schedule": {"name": "discrete"},
                                    "prediction": "v_prediction"}, DiscreteSD3.Config))
    assert isinstance(teacher.schedule, NoiseSchedule) and teacher.prediction == "v_prediction"
    scheduler = teacher.sampling_scheduler("sample")
    assert isinstance(scheduler, EulerDiscreteScheduler)
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.prediction_type == "sample"
    x = torch.randn(1, 16, 8, 8)
    out = teacher.predict(x, torch.tensor([999]), {"text": torch.randn(1, 7, 32), "pooled": torch.randn(1, 64)})
    assert all(torch.isfinite(o).all() for o in out)


def test_sd3_backbone_tokens_equal_the_transformer_after_its_first_block(sd3):
    """The backbone's image tokens are the network's own: the full transformer's hidden states after block 1,
    read through a hook, equal the backbone's map (same weights at the copy)."""
    teacher, codec, _ = sd3
    cls = BACKBONES.get("transformer_blocks")
    backbone = cls(cls.Config(blocks=1), teacher=teacher)
    x, t, cond = torch.randn(1, 16, 8, 8), torch.tensor([500]), codec.encode_text(["a red cat"])
    seen = {}
    hook = teacher.denoiser.transformer.transformer_blocks[0].register_forward_hook(
        lambda m, i, out: seen.update(hidden=out[1]))  # returns None: the output is left as it is
    with torch.no_grad():
        teacher.denoiser(x, t, cond)
        feats = backbone(x, t, cond)
    hook.remove()
    assert torch.allclose(feats.flatten(2).transpose(1, 2), seen["hidden"], atol=1e-5)


def test_transformer_lora_targets_attention_and_mlp_only(sd3, flux):
    for teacher in (sd3[0], flux[0]):
        targets = LoRA(LoRA.Config(rank=4)).targets(teacher.denoiser)
        assert targets and all(t.startswith("transformer.") for t in targets)
        assert any(".attn.to_q" in t for t in targets) and any(".ff." in t or "proj_mlp" in t for t in targets)
        banned = ("pos_embed", "x_embedder", "time_text_embed", "context_embedder", "norm_out", "norm1")
        assert not any(b in t.split(".") for t in targets for b in banned), targets
        assert "transformer.proj_out" not in targets
    assert any(t.endswith("single_transformer_blocks.0.proj_out") for t in LoRA(LoRA.Config()).targets(flux[0].denoiser))


# -- the family recipes through the CLI, exported and loaded back ---------------------------------------------------
def _train(family, variant, folder, images, tmp_path_factory, extra=()):
    from lightning_distill.config.recipe import load_recipe

    recipe = ROOT / "recipes" / f"{family}_lightning" / f"{variant}.yaml"
    out = tmp_path_factory.mktemp("runs") / f"{family}-{variant}"
    args = fast_overrides(load_recipe(recipe).resolved, {"pipeline": folder, "images": images}, lr=1e-3)
    result = run_cli("train", str(recipe), "--out", str(out), *args, "data.resolution=32", *extra, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six captioned images of at least 32 px (the transformers need 2 x 2 tokens after packing)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (36 + 2 * i, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(PROMPTS[i % 2])
    return folder


@pytest.fixture(scope="module")
def sd3_run(tiny_sd3, images, tmp_path_factory):
    return _train("sd3", "lora", tiny_sd3, images, tmp_path_factory)


@pytest.fixture(scope="module")
def flux_run(tiny_flux, images, tmp_path_factory):
    return _train("flux", "full", tiny_flux, images, tmp_path_factory)


def _phases(run):
    return sorted(p.stem for p in (run / "phases").glob("*.safetensors"))


def test_family_recipes_run_every_phase_kind(sd3_run, flux_run):
    assert [p.split("-", 1)[1] for p in _phases(sd3_run)] == [
        "s32-mse-lora", "s8-cond-lora", "s8-uncond-lora", "s4-cond-lora", "s4-uncond-lora", "s2-mse-lora",
        "s2-cond-lora", "s2-uncond-lora"]
    kinds = [p.split("-", 1)[1] for p in _phases(flux_run)]
    assert kinds[0] == "s32-mse" and kinds[-1] == "s1-uncond" and "s8-uncond" in kinds and len(kinds) == 14
    assert kinds.index("s2-mse") + 1 == kinds.index("s2-cond-lora") and kinds.index("s1-mse") + 1 == kinds.index("s1-cond")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_diffusers_export_loads_in_the_pipeline_and_samples_like_our_sampler(family, sd3_run, flux_run, tmp_path):
    import diffusers

    from lightning_distill.run_folder import RunFolder
    from lightning_distill.inference.sample import sample_exported, sample_run
    from lightning_distill.utils.tensors import strip_prefix

    run = {"sd3": sd3_run, "flux": flux_run}[family]
    out = tmp_path / "export"
    result = run_cli("export", str(run), "--format", "diffusers", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "lightning_distill.json").read_text())
    network = getattr(diffusers, meta["network_class"]).from_pretrained(str(out / "transformer"))
    folder = RunFolder(run)
    trained = strip_prefix(folder.artifact(folder.pick()), "student.net.transformer.")
    assert all(torch.equal(v, trained[k]) for k, v in network.state_dict().items())
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out / "scheduler"))
    assert scheduler.config.shift == 3.0
    assert meta["sigmas"] == trailing_sigmas(meta["steps"]) and f"sigmas={meta['sigmas']}" in (out / "README.md").read_text()
    ours = sample_run(run, PROMPTS, seed=3, size=32)
    theirs = sample_exported(out, PROMPTS, seed=3, size=32)
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-4


def test_sd3_lora_export_fuses_into_the_trained_transformer(sd3_run, tiny_sd3, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from lightning_distill.run_folder import RunFolder
    from lightning_distill.utils.tensors import strip_prefix

    out = tmp_path / "lora"
    result = run_cli("export", str(sd3_run), "--format", "lora", "--rank", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "lightning_distill.json").read_text())
    assert meta["layers"] > 0 and meta["max_relative_error"] < 1e-4 and meta["max_change_outside_lora"] == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3))
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    folder = RunFolder(sd3_run)
    trained = strip_prefix(folder.artifact(folder.pick()), "student.net.transformer.")
    fused = pipe.transformer.state_dict()
    for k in trained:
        assert torch.allclose(fused[k], trained[k], atol=1e-5), k
    comfy = tmp_path / "comfy"
    assert run_cli("export", str(sd3_run), "--format", "comfyui", "--rank", "8", "--out", str(comfy)).returncode == 0
    from safetensors.torch import load_file

    keys = load_file(str(comfy / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("lora_transformer_transformer_blocks_") for k in keys)


def test_a_full_runs_comfyui_file_carries_every_weight_the_run_changed(flux_run, tiny_flux, tmp_path):
    """A full run changes biases, norms and embeddings a LoRA does not reach: the ComfyUI file carries them as whole
    differences (``.diff``, ``.diff_b``), so that base + every LoRA product + every difference is the trained
    network, key by key, under the kohya names ComfyUI maps (``lora_transformer_<diffusers path with _>``)."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from lightning_distill.run_folder import RunFolder
    from lightning_distill.utils.tensors import strip_prefix

    out = tmp_path / "comfy"
    result = run_cli("export", str(flux_run), "--format", "comfyui", "--rank", "64", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "lightning_distill.json").read_text())
    assert meta["max_change_outside_lora"] == 0 and meta["diff_weights"] > 0
    comfy = load_file(str(out / "pytorch_lora_weights.safetensors"))
    base = FluxTransformer2DModel.from_pretrained(str(tiny_flux), subfolder="transformer").state_dict()
    folder = RunFolder(flux_run)
    trained = strip_prefix(folder.artifact(folder.pick()), "student.net.transformer.")
    names = {"lora_transformer_" + k.rpartition(".")[0].replace(".", "_"): k.rpartition(".")[0] for k in base}
    assert len(names) == len({k.rpartition(".")[0] for k in base})  # the kohya names are unambiguous
    rebuilt = {k: v.clone().float() for k, v in base.items()}
    for key, value in comfy.items():
        kohya, _, kind = key.partition(".")
        name = names[kohya]
        if kind == "lora_down.weight":
            up = comfy[f"{kohya}.lora_up.weight"]
            scale = float(comfy[f"{kohya}.alpha"]) / value.shape[0]
            rebuilt[f"{name}.weight"] += scale * (up.flatten(1) @ value.flatten(1)).reshape(base[f"{name}.weight"].shape)
        elif kind in ("diff", "diff_b"):
            rebuilt[f"{name}.{'weight' if kind == 'diff' else 'bias'}"] += value
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert any(k.endswith(".bias") for k in changed) and any("norm" in k for k in changed)
    for k in base:
        assert torch.allclose(rebuilt[k], trained[k].float(), atol=1e-5), k


def test_sd15_recipe_trains_and_exports_to_the_sd_pipeline(tiny_sd15, images, tmp_path_factory, tmp_path):
    from lightning_distill.inference.sample import sample_exported, sample_run

    run = _train("sd15", "lora", tiny_sd15, images, tmp_path_factory)
    out = tmp_path / "export"
    assert run_cli("export", str(run), "--format", "diffusers", "--out", str(out)).returncode == 0
    meta = json.loads((out / "lightning_distill.json").read_text())
    assert meta["pipeline"] == "StableDiffusionPipeline" and meta["network_folder"] == "unet"
    ours = sample_run(run, PROMPTS, seed=3, size=32)
    theirs = sample_exported(out, PROMPTS, seed=3, size=32)
    assert (ours - theirs).abs().max() < 1e-4


def test_frozen_features_backbone_trains_only_its_head(sd3):
    """LADD's discriminator: the frozen teacher's token maps (not a copy, not in the state dict), only the head
    trains, and the generator's gradient reaches the latents through the frozen weights."""
    from lightning_distill.config.registry import DISCRIMINATORS

    teacher, codec, _ = sd3
    cls = DISCRIMINATORS.get("backbone_head")
    config = validate({"backbone": {"name": "frozen_features", "blocks": [1]},
                       "head": {"name": "conv", "channels": 16, "groups": 8}}, cls.Config)
    disc = cls(config, teacher=teacher, conditional=True)
    assert all(k.startswith("head.") for k in disc.state_dict())
    assert sum(p.numel() for p in disc.parameters()) == sum(p.numel() for p in disc.head.parameters())
    x_prev = torch.randn(2, 16, 8, 8, requires_grad=True)
    cond = codec.encode_text(PROMPTS)
    logits = disc(x_prev, torch.tensor([300, 100]), cond, torch.randn(2, 16, 8, 8), torch.tensor([999, 500]))
    assert logits.shape == (2,)
    logits.sum().backward()
    assert x_prev.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.denoiser.parameters())
    with torch.no_grad():
        maps = teacher.denoiser.token_maps(x_prev, torch.tensor([300, 100]), cond, [1])
    assert torch.allclose(disc.backbone(x_prev, torch.tensor([300, 100]), cond), maps[0])


def test_sd3_recipe_runs_with_the_frozen_feature_discriminator(tiny_sd3, images, tmp_path_factory):
    run = _train("sd3", "lora", tiny_sd3, images, tmp_path_factory,
                 extra=["method.discriminator.backbone={name: frozen_features}", "method.discriminator.head.groups=8"])
    assert len(_phases(run)) == 8  # the LoRA recipe's phases, the 2-step MSE start among them


def test_diffusion_method_trains_a_flow_transformer_the_sd3_teacher_loads(tmp_path):
    """How the tiny flow teacher is made: the diffusion method on a flow schedule, exported as an SD3 transformer
    folder with its FlowMatch scheduler, which the ``sd3`` teacher loads with the same shift."""
    recipe = ROOT / "recipes" / "tiny" / "teacher_flow.yaml"
    run, out = tmp_path / "run", tmp_path / "export"
    args = ["schedule.steps=2", "train.batch_size=4", "train.preview_every=0", "train.log_every=1",
            "method.transformer.num_layers=2", "callbacks=[]"]
    result = run_cli("train", str(recipe), "--out", str(run), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert run_cli("export", str(run), "--format", "diffusers", "--out", str(out)).returncode == 0
    assert (out / "transformer" / "config.json").is_file()
    teacher = _build(TEACHERS, "sd3", pretrained=str(out))
    assert isinstance(teacher.schedule, FlowMatchSchedule) and teacher.schedule.config.shift == 1.5
    assert teacher.prediction == "flow" and teacher.denoiser.in_channels == 3
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([999, 100])
    cond = {"text": torch.randn(2, 20, 384)}
    from lightning_distill.run_folder import RunFolder

    model = RunFolder(run).phase_model(RunFolder(run).pick())
    with torch.no_grad():
        assert torch.allclose(teacher.denoiser(x, t, cond), model.denoiser.half().float()(x, t, cond), atol=1e-3)


def test_diffusion_method_continues_from_an_exported_teacher(tmp_path):
    """``method.init``: training starts from an exported folder's network (how a teacher is trained further); with
    lr 0 the run's model is the folder's; a folder of another configuration is refused before training, by name."""
    recipe = ROOT / "recipes" / "tiny" / "teacher_flow.yaml"
    small = ["train.batch_size=4", "train.preview_every=0", "method.transformer.num_layers=2", "callbacks=[]"]
    first, folder, second = tmp_path / "first", tmp_path / "export", tmp_path / "second"
    assert run_cli("train", str(recipe), "--out", str(first), "schedule.steps=2", *small).returncode == 0
    assert run_cli("export", str(first), "--format", "diffusers", "--out", str(folder)).returncode == 0
    result = run_cli("train", str(recipe), "--out", str(second), "schedule.steps=1", "schedule.lr=0",
                     f"method.init={folder}", *small)
    assert result.returncode == 0, result.stderr[-3000:]
    from lightning_distill.run_folder import RunFolder

    teacher = _build(TEACHERS, "sd3", pretrained=str(folder))
    model = RunFolder(second).phase_model(RunFolder(second).pick())
    started = model.denoiser.network.state_dict()
    for k, v in teacher.denoiser.network.state_dict().items():
        assert torch.equal(started[k].half(), v.half()), k
    wrong = run_cli("train", str(recipe), "--out", str(tmp_path / "wrong"), "schedule.steps=1",
                    f"method.init={folder}", *small[:-2], "method.transformer.num_layers=3", "callbacks=[]")
    assert wrong.returncode != 0 and "do not fit the network of method.transformer" in wrong.stderr
    assert not (tmp_path / "wrong" / "checkpoints").exists() or not any((tmp_path / "wrong" / "checkpoints").iterdir())


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_cache_stores_what_the_familys_network_takes(family, tiny_sd15, tiny_sd3, images, tmp_path):
    """``cache`` with the family's codec: latents and exactly the conditioning the codec gives (SD1.5: text only;
    SD3: text and pooled), and training reads the cache."""
    from safetensors.torch import load_file

    folder = {"sd15": tiny_sd15, "sd3": tiny_sd3}[family]
    recipe = ROOT / "recipes" / f"{family}_lightning" / "lora.yaml"
    common = [f"codec.pretrained={folder}", f"data.root={images}", "data.resolution=32", "train.batch_size=2"]
    result = run_cli("cache", str(recipe), "--out", str(tmp_path / "cache"), *common)
    assert result.returncode == 0, result.stderr[-3000:]
    shard = load_file(str(tmp_path / "cache" / "shard-00000.safetensors"))
    codec = _build(CODECS, family, pretrained=str(folder))
    expected = codec.caption_conditioning([p.read_text() for p in sorted(images.glob("*.txt"))], 32, 32, "cpu")
    assert set(shard) == {"latents", *expected}
    for k, v in expected.items():
        assert torch.allclose(shard[k], v, atol=1e-6), k
    args = fast_overrides({"schedule": {"stages": []}}, {"pipeline": folder, "images": images})
    result = run_cli("train", str(recipe), "--out", str(tmp_path / "run"), *args,
                     f"data={{name: cached, root: {tmp_path / 'cache'}}}", "schedule.steps_scale=0.0005")
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_multilevel_discriminator_on_frozen_transformer_features(family, sd3, flux, tiny_sd3):
    """LADD's discriminator on a transformer: one conditioned head per chosen block's token map, only the heads and
    the conditioning embedding train, the frozen teacher gets no gradient, the latents do; the hook path (what
    FSDP2 runs) gives the very maps the direct path gives."""
    from lightning_distill.config.registry import DISCRIMINATORS

    teacher, codec, _ = sd3 if family == "sd3" else flux
    cls = DISCRIMINATORS.get("multilevel")
    config = validate({"backbone": {"name": "frozen_features", "blocks": [1]}, "channels": 16, "groups": 8,
                       "embed_dim": 32}, cls.Config)
    disc = cls(config, teacher=teacher, conditional=True)
    assert not any(k.startswith("backbone.") for k in disc.state_dict())
    width = disc.backbone.level_channels[0]
    assert len(disc.heads) == 1 and disc.heads[0].body[0].in_channels == 2 * width  # x_t and x_{t-ns} maps
    assert set(disc.text_proj) == {"text", "pooled"}
    x_prev = torch.randn(2, 16, 8, 8, requires_grad=True)
    t_prev, t = torch.tensor([300, 100]), torch.tensor([999, 500])
    cond = codec.encode_text(PROMPTS)
    maps = disc.backbone.features(x_prev, t_prev, cond)
    h, w = teacher.denoiser.token_grid(x_prev)
    assert [m.shape for m in maps] == [(2, width, h, w)]
    logits = disc(x_prev, t_prev, cond, torch.randn(2, 16, 8, 8), t)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert x_prev.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.denoiser.parameters())
    assert all(p.grad is not None for p in disc.parameters())
    with torch.no_grad():
        hooked = teacher.denoiser.token_maps_by_hooks(x_prev, t_prev, cond, [1])
        direct = teacher.denoiser.token_maps(x_prev, t_prev, cond, [1])
    assert torch.allclose(hooked[0], direct[0], atol=1e-6)


@pytest.mark.slow  # about a minute on 2 cores: the default run stays under 15 minutes
def test_multilevel_discriminator_under_fsdp2_equals_one_process(tiny_sd3, tmp_path):
    """The frozen-feature multi-level discriminator on a teacher sharded by FSDP2 over 2 processes: its logits and
    the latents' gradient equal those of the unsharded modules in one process."""
    import subprocess
    import sys

    from support import HELPERS

    result = subprocess.run([sys.executable, str(HELPERS / "ladd_fsdp.py"), str(tmp_path), str(tiny_sd3)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tmp_path / "RESULT.json").read_text())
    assert r["world_size"] == 2 and r["teacher_is_dtensor"]
    assert r["logits_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r
