"""Export and sampling of a tiny SDXL-shaped run: diffusers UNet folder, LoRA, ComfyUI LoRA, our sampler."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from support import ROOT, run_cli
from support import fast_overrides

SEED, PROMPTS = 3, ["a red cat", "a small blue square on the left"]


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, tmp_path_factory):
    """The LoRA recipe's ladder on the tiny pipeline, 2 steps a phase at a high learning rate (visible changes)."""
    from lightning_distill.config.recipe import load_recipe

    recipe = ROOT / "recipes" / "sdxl_lightning" / "lora.yaml"
    out = tmp_path_factory.mktemp("runs") / "lora"
    args = fast_overrides(load_recipe(recipe).resolved, tiny_sdxl, lr=1e-3, steps=2)
    result = run_cli("train", str(recipe), "--out", str(out), *args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _student(run):
    from lightning_distill.run_folder import RunFolder
    from lightning_distill.utils.tensors import strip_prefix

    folder = RunFolder(run)
    return strip_prefix(folder.artifact(folder.pick()), "student.net.unet.")


def test_diffusers_export_loads_and_samples_like_our_sampler(lora_run, tiny_sdxl, tmp_path):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from lightning_distill.inference.sample import sample_exported, sample_run

    out = tmp_path / "export"
    result = run_cli("export", str(lora_run), "--format", "diffusers", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    trained = _student(lora_run)
    assert all(torch.equal(v, trained[k]) for k, v in unet.state_dict().items())
    scheduler = EulerDiscreteScheduler.from_pretrained(str(out / "scheduler"))
    assert scheduler.config.timestep_spacing == "trailing" and scheduler.config.prediction_type == "epsilon"
    card = (out / "README.md").read_text()
    assert "num_inference_steps=2" in card and "guidance_scale=0" in card and "trailing" in card
    assert json.loads((out / "lightning_distill.json").read_text())["steps"] == 2
    ours = sample_run(lora_run, PROMPTS, seed=SEED, size=16)
    theirs = sample_exported(out, PROMPTS, seed=SEED, size=16)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # without --size, the export samples at the resolution the run trained at (recorded), not at 1024
    from lightning_distill.run_folder import RunFolder

    trained_at = RunFolder(lora_run).recipe.data.config.resolution
    assert json.loads((out / "lightning_distill.json").read_text())["resolution"] == trained_at == 16
    assert sample_exported(out, PROMPTS[:1], seed=SEED).shape == (1, 3, 16, 16)


def test_lora_and_comfyui_exports_a_family_cannot_load_are_refused_with_the_way_out(lora_run, tmp_path,
                                                                                        monkeypatch):
    from lightning_distill.errors import UserError
    from lightning_distill.export import diffusers as export_module
    from lightning_distill.inference.sample import sample_exported

    assert export_module.lora_loadable("StableDiffusionXLPipeline") and export_module.lora_loadable("FluxPipeline")
    assert not export_module.lora_loadable("PixArtAlphaPipeline")  # a diffusers pipeline without load_lora_weights
    monkeypatch.setattr(export_module, "COMFYUI_PIPELINES", frozenset({"FluxPipeline"}))  # as for another family
    with pytest.raises(UserError, match="--format lora"):
        export_module.export(lora_run, "comfyui", tmp_path / "comfy")
    assert not (tmp_path / "comfy").exists()
    monkeypatch.setattr(export_module, "lora_loadable", lambda pipeline: False)
    with pytest.raises(UserError, match="--format diffusers"):
        export_module.export(lora_run, "lora", tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    # a family's own pipeline call arguments are recorded in the export and its model card
    from lightning_distill.models.sdxl.network import SDXLTeacher

    monkeypatch.setattr(SDXLTeacher, "pipeline_call", {"clip_skip": None})
    meta = export_module.export(lora_run, "diffusers", tmp_path / "call")
    assert meta["pipeline_call"] == {"clip_skip": None}
    assert json.loads((tmp_path / "call" / "lightning_distill.json").read_text())["pipeline_call"] == {"clip_skip": None}
    assert "guidance_scale=0, clip_skip=None).images[0]" in (tmp_path / "call" / "README.md").read_text()
    # an export folder naming such a pipeline: sample says why, not an AttributeError
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "lightning_distill.json").write_text(json.dumps(
        {"base": "x", "pipeline": "PixArtAlphaPipeline", "steps": 2, "prediction": "epsilon", "format": "lora"}))
    with pytest.raises(UserError, match="has no load_lora_weights.*--format diffusers"):
        sample_exported(folder, ["a cat"])


def test_lora_export_fuses_into_the_trained_unet(lora_run, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "lora"
    # LoRA-only training: 7 phases of rank-4 LoRA, merged one after another, so the total change of a layer has
    # rank <= 28 and rank 32 factors it exactly
    result = run_cli("export", str(lora_run), "--format", "lora", "--rank", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "lightning_distill.json").read_text())
    assert meta["layers"] > 0 and meta["max_relative_error"] < 1e-4 and meta["max_change_outside_lora"] == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl["pipeline"]))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    trained = _student(lora_run)
    changed = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert changed
    for k in trained:
        assert torch.allclose(fused[k], trained[k], atol=1e-5), k


def test_comfyui_keys_map_one_to_one_onto_diffusers_keys(lora_run, tmp_path):
    for fmt in ("lora", "comfyui"):
        assert run_cli("export", str(lora_run), "--format", fmt, "--rank", "8", "--out", str(tmp_path / fmt)).returncode == 0
    peft = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    comfy = load_file(str(tmp_path / "comfyui" / "pytorch_lora_weights.safetensors"))
    mapped = {}
    for key, value in peft.items():
        name, kind = key[len("unet."):].rsplit(".lora_", 1)
        base = "lora_unet_" + name.replace(".", "_")
        mapped[f"{base}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value
    weights = {k: v for k, v in comfy.items() if not k.endswith(".alpha")}
    assert weights.keys() == mapped.keys() and len(weights) == len(peft)
    assert all(torch.equal(weights[k], mapped[k]) for k in weights)
    alphas = {k: v for k, v in comfy.items() if k.endswith(".alpha")}
    assert len(alphas) == len(peft) // 2 and all(float(v) == 8.0 for v in alphas.values())
    assert all(k.startswith("lora_unet_") and "." not in k.split(".")[0][len("lora_unet_"):] for k in comfy)


def test_sample_command_writes_a_grid(lora_run, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    result = run_cli("sample", str(lora_run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--size", "16",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(out) as im:
        assert im.size == (2 * 17 + 1, 17 + 1)  # two 16-px tiles with 1-px borders


def test_export_errors_are_user_errors(lora_run, tmp_path):
    result = run_cli("export", str(lora_run), "--stage", "s99", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "no such stage" in result.stderr and "s8" in result.stderr
    result = run_cli("export", str(tmp_path), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "not a run folder" in result.stderr
    assert not (tmp_path / "x").exists()


def test_export_never_replaces_the_run_or_a_foreign_folder(lora_run, tmp_path):
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "precious.bin").write_bytes(b"x")
    for out in (lora_run, lora_run.parent, foreign):
        result = run_cli("export", str(lora_run), "--out", str(out))
        assert result.returncode == 2, result.stderr[-2000:]
    assert (foreign / "precious.bin").is_file() and (lora_run / "recipe.yaml").is_file()
    result = run_cli("export", str(lora_run), "--rank", "0", "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "positive" in result.stderr
    result = run_cli("sample", str(lora_run), "--prompt", "a cat", "--size", "12", "--out", str(tmp_path / "g.png"))
    assert result.returncode == 2 and "multiple of 8" in result.stderr


def test_export_reads_the_facts_recorded_with_the_phase(lora_run, tmp_path):
    """Steps and prediction type come from the artifact's metadata, as the method recorded them, not re-derived."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lightning_distill.engine.artifacts import digest_path
    from lightning_distill.run_folder import RunFolder
    from lightning_distill.utils.files import digest

    folder = RunFolder(lora_run)
    phase = folder.pick()
    with safe_open(str(folder.artifact_path(phase)), "pt") as f:
        recorded = f.metadata()
    assert recorded == {"stage": phase.stage, "kind": phase.kind, "prediction": "epsilon",
                        "steps": str(phase.options.student_steps)}
    # a copy of the run whose last artifact records another parameterisation: export follows the record
    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    path = RunFolder(copy).artifact_path(phase)
    save_file(load_file(str(path)), str(path), metadata={**recorded, "prediction": "v_prediction"})
    digest_path(path).write_text(json.dumps(digest(path)))  # rewritten on purpose, so recorded as such
    result = run_cli("export", str(copy), "--format", "diffusers", "--out", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "export" / "lightning_distill.json").read_text())
    assert meta["prediction"] == "v_prediction" and meta["steps"] == phase.options.student_steps
    scheduler = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["timestep_spacing"] == "trailing"
