"""SDXL components on a tiny SDXL-shaped pipeline that the tests build: real loading code, nothing downloaded."""

from __future__ import annotations

import pytest
import torch

from support import ROOT, fast_overrides
from lightning_distill import UserError
from lightning_distill.config.registry import REGISTRIES


def _build(role, name, **fields):
    cls = REGISTRIES[role].get(name)
    return cls, cls.Config(**fields)


@pytest.fixture(scope="module")
def teacher(tiny_sdxl):
    cls, cfg = _build("teacher", "sdxl", pretrained=str(tiny_sdxl["pipeline"]))
    return cls(cfg)


@pytest.fixture(scope="module")
def codec(tiny_sdxl):
    cls, cfg = _build("codec", "sdxl", pretrained=str(tiny_sdxl["pipeline"]))
    return cls(cfg)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl["pipeline"]))


def _cond(codec, captions=("a red cat", "a blue square on the left")):
    from lightning_distill.codecs.sdxl import default_time_ids

    return codec.encode_text(list(captions), default_time_ids(16, 16, len(captions)))


def test_loading_reads_the_folder_and_its_scheduler_config(teacher, codec):
    assert teacher.prediction == "epsilon" and teacher.schedule.T == 1000
    assert not any(p.requires_grad for p in teacher.parameters())
    assert codec.scaling == pytest.approx(0.13025)
    assert not any(p.requires_grad for p in codec.parameters())


def test_missing_folder_is_a_user_error(tmp_path):
    cls, cfg = _build("teacher", "sdxl", pretrained=str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="no folder"):
        cls(cfg)


def test_text_embeddings_match_diffusers_encode_prompt(codec, pipe):
    captions = ["a red cat", "a blue square on the left"]
    ours = _cond(codec, captions)
    text, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    assert ours["text"].shape == text.shape == (2, 16, 64)
    assert torch.allclose(ours["text"], text, atol=1e-6) and torch.allclose(ours["pooled"], pooled, atol=1e-6)
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(ours["time_ids"][0], ids[0])
    empty = codec.encode_text([""], ours["time_ids"][:1])
    assert torch.count_nonzero(empty["text"]) == 0 and torch.count_nonzero(empty["pooled"]) == 0


def test_vae_round_trip_shapes(codec):
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 4, 8, 8)
    assert codec.decode(latents).shape == pixels.shape


def test_teacher_sampler_matches_the_diffusers_pipeline_with_euler_trailing(teacher, codec, pipe):
    """4 steps, guidance off: our DDIM sampler and diffusers' SDXL pipeline with Euler (trailing) agree."""
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    expected = pipe(prompt="a red cat", num_inference_steps=4, guidance_scale=0.0, latents=noise,  # the pipeline scales by init_noise_sigma itself
                    output_type="latent", height=16, width=16).images
    cond = _cond(codec, ["a red cat"])
    path = torch.tensor([[*teacher.schedule.timesteps(4), -1]])
    # diffusers starts trailing Euler at noise * sigma_max in sigma-space, i.e. noise * sigma_max * sqrt(ᾱ_T) here
    start = noise * pipe.scheduler.init_noise_sigma * teacher.schedule.alpha_bar(torch.tensor(999)).sqrt().float()
    ours = teacher(start, path, cond, 0.0)
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()


def test_guidance_combines_conditional_and_unconditional(teacher, codec):
    cond = _cond(codec, ["a red cat"])
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    plain = teacher.predict(x, t, cond, 0.0)[1]
    uncond = teacher.predict(x, t, {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}, 0.0)[1]
    guided = teacher.predict(x, t, cond, 6.0)[1]
    assert torch.allclose(guided, uncond + 6.0 * (plain - uncond), atol=1e-4)


def test_unet_encoder_backbone_equals_the_unet_mid_block(teacher, codec):
    cls, cfg = _build("backbone", "unet_encoder")
    backbone = cls(cfg, teacher=teacher)
    assert all(p.requires_grad for p in backbone.parameters())
    unet = teacher.denoiser.unet
    captured = {}
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    cond = _cond(codec)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 250])
    teacher.denoiser(x, t, cond)
    handle.remove()
    feats = backbone(x, t, cond)
    assert feats.shape == (2, backbone.out_channels, 4, 4)
    assert torch.allclose(feats, captured["mid"], atol=1e-5)
    # a copy: training it leaves the teacher alone
    assert backbone.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()


@pytest.mark.parametrize("conditional", [True, False])
def test_discriminator_on_the_unet_backbone(teacher, codec, conditional):
    cls, cfg = _build("discriminator", "backbone_head", backbone={"name": "unet_encoder"},
                      head={"name": "conv", "channels": 32, "blocks": 1})
    from lightning_distill.config.fields import validate

    cfg = validate({"backbone": {"name": "unet_encoder"}, "head": {"name": "conv", "channels": 32}}, cls.Config)
    disc = cls(cfg, teacher=teacher, conditional=conditional)
    cond = _cond(codec)
    x_t, x_prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    logits = disc(x_prev, torch.tensor([499, -1]), cond, x_t, torch.tensor([999, 249]))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in disc.head.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_lora_follows_the_lcm_lora_rule_and_merges_like_peft(teacher):
    import copy

    from lightning_distill.config.fields import validate

    cls = REGISTRIES["adapter"].get("lora")
    lora = cls(validate({"rank": 4}, cls.Config))
    net = copy.deepcopy(teacher.denoiser).requires_grad_(True)
    targets = lora.targets(net)
    assert targets and not any(t.split(".")[1] in ("conv_in", "conv_out", "time_embedding", "add_embedding") for t in targets)
    assert any(t.endswith("attn1.to_q") for t in targets) and any(t.endswith("conv1") for t in targets)
    assert any(t.endswith("time_emb_proj") for t in targets)
    lora.apply(net)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero; give it weight so the merge has something to fold
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    merged = lora.merge_state(net.state_dict())
    plain = teacher.denoiser.state_dict()
    assert merged.keys() == plain.keys()
    from peft.tuners.lora import LoraLayer

    for module in net.modules():  # peft's own merge, the reference
        if isinstance(module, LoraLayer):
            module.merge()
    reference = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if ".lora_" not in k}
    changed = 0
    for k in plain:
        assert torch.allclose(merged[k], reference[k], atol=1e-6), k
        changed += not torch.equal(merged[k], plain[k])
    assert changed >= len(targets)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_sdxl_recipe_runs_every_phase_kind_through_the_cli(cli, tiny_sdxl, tmp_path, variant):
    from lightning_distill.config.recipe import load_recipe

    recipe = ROOT / "recipes" / "sdxl_lightning" / f"{variant}.yaml"
    out = tmp_path / variant
    args = fast_overrides(load_recipe(recipe).resolved, tiny_sdxl)
    result = cli("train", str(recipe), "--out", str(out), *args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    phases = sorted(p.name for p in (out / "phases").glob("*.safetensors"))
    kinds = {"full": ["s32-mse", "s8-cond-lora", "s8-uncond-lora", "s8-uncond", "s2-uncond", "s1-x0_convert",
                      "s1-cond", "s1-uncond"],
             "lora": ["s32-mse-lora", "s8-cond-lora", "s8-uncond-lora", "s2-uncond-lora"]}[variant]
    for kind in kinds:
        assert any(p.endswith(f"-{kind}.safetensors") for p in phases), (kind, phases)
    # merged: every phase hands on plain UNet weights (no LoRA keys)
    from safetensors.torch import load_file

    last = load_file(str(sorted((out / "phases").glob("*.safetensors"))[-1]))
    assert last and not any("lora_" in k or "base_layer" in k for k in last)
    assert any(k.startswith("student.net.unet.") for k in last)


def test_frozen_unet_encoder_is_the_teachers_own_and_trains_only_the_head(teacher, codec):
    """LADD-style: the same features as the copy, no parameters of its own, gradients reach the input only."""
    from lightning_distill.config.fields import validate

    cls, cfg = _build("backbone", "unet_encoder")
    copied = cls(cfg, teacher=teacher)
    frozen = cls(validate({"frozen": True}, cls.Config), teacher=teacher)
    assert list(frozen.parameters()) == [] and frozen.state_dict() == {}
    assert frozen.conv_in is teacher.denoiser.unet.conv_in
    cond = _cond(codec)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.tensor([999, 250])
    assert torch.allclose(frozen(x, t, cond), copied(x, t, cond), atol=1e-6)
    dcls = REGISTRIES["discriminator"].get("backbone_head")
    disc = dcls(validate({"backbone": {"name": "unet_encoder", "frozen": True}, "head": {"name": "conv", "channels": 32}},
                         dcls.Config), teacher=teacher, conditional=True)
    assert {n.split(".")[0] for n, _ in disc.named_parameters()} == {"head"}
    logits = disc(x, torch.tensor([499, 249]), cond, x.detach(), torch.tensor([999, 499]))
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
