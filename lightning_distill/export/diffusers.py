"""``export``: a finished phase of a run as files the diffusers and ComfyUI ecosystems load.

- ``diffusers``: the network's folder of its family's pipeline (``unet/`` for SD1.5/SDXL, ``transformer/`` for
  SD3/Flux; ``from_pretrained``), ``scheduler/`` (UNets: Euler, trailing spacing, the student's prediction type;
  flow models: ``FlowMatchEulerDiscreteScheduler`` with the base's shift, sampled with the ``sigmas`` the card
  gives), ``README.md`` (a model card: recipe, steps, how to sample), ``lightning_distill.json`` (the base model,
  pipeline, steps, prediction and sigmas, for ``lightning-distill sample``).
- ``lora``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` + ``pipe.fuse_lora``: the
  difference between the distilled and the base UNet on the LoRA-targeted layers, factored to ``rank`` by SVD
  (exact when the difference has at most that rank, as after LoRA-only training).
- ``comfyui``: the same LoRA with kohya/ComfyUI key names (``lora_unet_..._to_q.lora_down.weight``, ``.alpha``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file

from lightning_distill.errors import UserError
from lightning_distill.utils.files import replace_folder
from lightning_distill.run_folder import RunFolder
from lightning_distill.export.lora import LORA_FILE, extract_lora, to_comfyui
from lightning_distill.models.noise import trailing_sigmas
from lightning_distill.utils.tensors import DTYPES

log = logging.getLogger(__name__)
Format = Literal["diffusers", "lora", "comfyui"]


COMFYUI_PIPELINES = frozenset({"StableDiffusionXLPipeline", "StableDiffusionPipeline", "StableDiffusion3Pipeline",
                               "FluxPipeline"})
"""Families whose networks ComfyUI's LoRA loader maps ``lora_unet_*`` / ``lora_transformer_*`` names onto."""


def lora_loadable(pipeline: str | None) -> bool:
    """Whether diffusers' ``pipeline`` class can load a LoRA file (``load_lora_weights``); unknown: assumed so."""
    import diffusers

    cls = getattr(diffusers, pipeline, None) if pipeline else None
    return cls is None or hasattr(cls, "load_lora_weights")


def check_out(out: Path, run_dir: Path) -> Path:
    """``--out`` must be new, empty, or an earlier export (which is then replaced); never the run or a parent."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out == run_dir.resolve() or out in run_dir.resolve().parents:
        raise UserError(f"--out {out} would replace the run folder {run_dir}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "lightning_distill.json").is_file():
        raise UserError(f"--out {out} is not empty and holds no export; choose a new or empty folder")
    return out


def export(run_dir: Path, fmt: Format, out: Path, stage: str | None = None, rank: int = 64) -> dict[str, Any]:
    """Write the chosen phase of ``run_dir`` to ``out`` in ``fmt``; returns what was written."""
    run_dir = Path(run_dir)
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    run = RunFolder(run_dir)
    out = check_out(Path(out), run_dir)
    phase = run.pick(stage)
    model = run.phase_model(phase)
    if model.network is None or model.scheduler is None:
        raise UserError(
            f"export needs a teacher loaded from a diffusers folder (its denoiser's ``network`` and the teacher's "
            f"``sampling_scheduler``: every teacher with ``pretrained``, e.g. sdxl, sd3, flux, a plugin family built on "
            f"SamplerTeacher); the network of {run_dir} has none. Its phase results are in {run_dir / 'phases'}"
        )
    if fmt != "diffusers" and model.base_network is None:
        raise UserError(f"{run_dir} trained a model from scratch (method {run.recipe.method.name}); export it with --format diffusers")
    if fmt == "comfyui" and model.pipeline not in COMFYUI_PIPELINES:
        raise UserError(f"ComfyUI maps kohya LoRA names onto the networks of {', '.join(sorted(COMFYUI_PIPELINES))} "
                        f"only; a {model.pipeline} network's names would load nothing there. Export {run_dir} with "
                        + ("--format lora (diffusers names) instead" if lora_loadable(model.pipeline) else
                           f"--format diffusers (merged weights) instead: {model.pipeline} loads no LoRA either"))
    if fmt == "lora" and not lora_loadable(model.pipeline):
        raise UserError(f"{model.pipeline} has no load_lora_weights, so a LoRA file would not load in it; export "
                        f"{run_dir} with --format diffusers (the LoRA merged into full weights) instead")
    facts = model.facts
    meta = {"base": model.base, "phase": phase.name, "stage": facts.stage, "steps": facts.steps,
            "prediction": facts.prediction, "format": fmt, "run": str(run_dir.resolve()),
            "pipeline": model.pipeline, "network_class": type(model.network).__name__,
            "network_folder": model.network_folder, "guidance": model.embedded_guidance,
            "sigmas": trailing_sigmas(facts.steps, model.schedule.T) if facts.prediction == "flow" and facts.steps else None,
            "resolution": getattr(getattr(run.recipe.data, "config", None), "resolution", None),
            "pipeline_call": model.pipeline_call}

    def write(tmp: Path) -> None:
        if fmt == "diffusers":
            model.network.to(DTYPES[model.export_dtype]).save_pretrained(tmp / model.network_folder)
            model.scheduler().save_pretrained(tmp / "scheduler")
        else:
            lora, info = extract_lora(model, rank, diffs=fmt == "comfyui")
            meta.update(info)
            save_file(to_comfyui(lora) if fmt == "comfyui" else lora, str(tmp / LORA_FILE), metadata={"format": "pt"})
        (tmp / "lightning_distill.json").write_text(json.dumps(meta, indent=2))
        if model.base is not None:
            (tmp / "README.md").write_text(model_card(meta, (run_dir / "recipe.yaml").read_text()))

    replace_folder(Path(out), write)
    return meta


def model_card(meta: dict[str, Any], recipe: str) -> str:
    steps, pred, folder = meta["steps"], meta["prediction"], meta.get("network_folder", "unet")
    pipeline, network = meta.get("pipeline") or "StableDiffusionXLPipeline", meta.get("network_class", "UNet2DConditionModel")
    flow = pred == "flow"
    if flow:
        scheduler, imports = "", f"{network}, {pipeline}"
        how = (f"{steps} steps, flow-matching Euler on the base's shift, at the sigmas below (our trailing steps; "
               "the pipelines' default grid differs)")
        guidance = meta.get("guidance") or 0
        call = (f'image = pipe("a photo of a cat", num_inference_steps={steps}, sigmas={meta["sigmas"]}, '
                f'guidance_scale={guidance}).images[0]')
    else:
        scheduler = (f'pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, '
                     f'timestep_spacing="trailing", prediction_type="{pred}")\n')
        imports = f"EulerDiscreteScheduler, {network}, {pipeline}"
        how = f"{steps} steps, Euler with **trailing** timestep spacing, **no** classifier-free guidance"
        call = f'image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=0).images[0]'
    extra = "".join(f", {k}={v!r}" for k, v in (meta.get("pipeline_call") or {}).items())  # the family's own
    call = call.replace(").images[0]", f"{extra}).images[0]")
    if meta["format"] == "diffusers":
        load = (f'{folder} = {network}.from_pretrained("THIS_FOLDER", subfolder="{folder}")\n'
                f'pipe = {pipeline}.from_pretrained("{meta["base"]}", {folder}={folder})')
    else:
        load = (f'pipe = {pipeline}.from_pretrained("{meta["base"]}")\n'
                f'pipe.load_lora_weights("THIS_FOLDER", weight_name="{LORA_FILE}")\npipe.fuse_lora()')
    comfy = ""
    if meta["format"] == "comfyui":
        sampler = "euler, scheduler simple" if flow else "euler, scheduler sgm_uniform"
        comfy = (f"\nComfyUI: put the LoRA file in `models/loras`, load it with *LoraLoader*, and sample with KSampler "
                 f"(sampler {sampler}, {steps} steps, CFG 1).\n")
    return f"""# {meta['phase']} — a {steps}-step model distilled with lightning-distill

Distilled from `{meta['base']}` by progressive adversarial diffusion distillation (SDXL-Lightning,
arXiv 2402.13929); phase `{meta['phase']}` of stage `{meta['stage']}`, prediction type `{pred}`.

## Sampling

{how}:

```python
import torch
from diffusers import {imports}

{load}
{scheduler}{call}
```
{comfy}
## Recipe

```yaml
{recipe}```
"""
