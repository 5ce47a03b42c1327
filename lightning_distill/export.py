"""``export``: a finished phase of a run as files the diffusers and ComfyUI ecosystems load.

- ``diffusers``: ``unet/`` (``UNet2DConditionModel.from_pretrained``), ``scheduler/`` (Euler, trailing spacing,
  the student's prediction type), ``README.md`` (a model card: recipe, steps, how to sample),
  ``lightning_distill.json`` (the base model, steps and prediction, for ``lightning-distill sample``).
- ``lora``: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights`` + ``pipe.fuse_lora``: the
  difference between the distilled and the base UNet on the LoRA-targeted layers, factored to ``rank`` by SVD
  (exact when the difference has at most that rank, as after LoRA-only training).
- ``comfyui``: the same LoRA with kohya/ComfyUI key names (``lora_unet_..._to_q.lora_down.weight``, ``.alpha``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import UserError
from .method import Phase
from .recipe import LoadedRecipe, load_recipe

log = logging.getLogger(__name__)
Format = Literal["diffusers", "lora", "comfyui"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def pick_phase(run_dir: Path, loaded: LoadedRecipe, stage: str | None) -> Phase:
    """The last finished phase of ``stage`` (a stage or phase name), or of the whole run."""
    phases = loaded.recipe.schedule.build().phases()
    if stage is not None:
        chosen = [p for p in phases if stage in (p.stage, p.name)]
        if not chosen:
            names = sorted({p.stage for p in phases} | {p.name for p in phases})
            raise UserError(f"--stage {stage!r}: no such stage or phase in {run_dir}; choose one of {', '.join(names)}")
        phases = chosen
    done = [p for p in phases if _artifact(run_dir, p).is_file()]
    if not done:
        raise UserError(f"{run_dir}: no finished phase{f' of {stage}' if stage else ''} yet (nothing in {run_dir / 'phases'})")
    return done[-1]


def _artifact(run_dir: Path, phase: Phase) -> Path:
    return run_dir / "phases" / f"{phase.index:02d}-{phase.name}.safetensors"


def load_run(run_dir: Path) -> LoadedRecipe:
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise UserError(f"{run_dir} is not a run folder (no recipe.yaml)")
    return load_recipe(recipe)


def student_state(run_dir: Path, phase: Phase) -> dict[str, Tensor]:
    state = load_file(str(_artifact(run_dir, phase)))
    return {k[len("student.net.") :]: v for k, v in state.items() if k.startswith("student.net.")}


def prediction_of(loaded: LoadedRecipe, phase: Phase) -> str:
    """The student's parameterisation in ``phase`` (the stage's, else the student's, else the base model's)."""
    chosen = phase.options["prediction"] or loaded.recipe.method.config.student.config.prediction
    if chosen:
        return chosen
    teacher = loaded.recipe.method.config.teacher
    pretrained = getattr(teacher.config, "pretrained", None)
    if pretrained:  # a diffusers folder (sdxl, unet): its scheduler config says, unless the recipe does
        from .components.sdxl import scheduler_schedule

        found = scheduler_schedule(pretrained)
        return teacher.config.prediction or (found[1] if found else "epsilon")
    return getattr(teacher.config, "prediction", None) or "epsilon"


def _unet_source(loaded: LoadedRecipe) -> tuple[str, str]:
    teacher = loaded.recipe.method.config.teacher
    if teacher.name != "sdxl":
        raise UserError(
            f"export needs a diffusers UNet model (teacher 'sdxl'); this run's teacher is {teacher.name!r}. "
            "Its students are in RUN/phases/*.safetensors"
        )
    return teacher.config.pretrained, teacher.config.subfolder


def base_unet(loaded: LoadedRecipe) -> Any:
    """The base UNet in float32, rounded through the teacher's dtype as the student's starting point was."""
    from diffusers import UNet2DConditionModel

    from .components.sdxl import DTYPES, _load

    pretrained, subfolder = _unet_source(loaded)
    teacher = loaded.recipe.method.config.teacher.config
    unet = _load(UNet2DConditionModel, pretrained, subfolder, variant=teacher.variant, torch_dtype=DTYPES[teacher.dtype])
    return unet.to(torch.float32)


def scheduler_for(loaded: LoadedRecipe, prediction: str) -> Any:
    """Euler with trailing spacing and the student's prediction type: how the Lightning models sample."""
    from diffusers import EulerDiscreteScheduler

    pretrained, _ = _unet_source(loaded)
    folder = Path(pretrained).expanduser() / "scheduler"
    base = EulerDiscreteScheduler.from_pretrained(str(folder)) if folder.is_dir() else EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return lightning_scheduler(base.config, prediction)


def lightning_scheduler(config: Any, prediction: str) -> Any:
    """Euler on the discrete schedule with trailing spacing and a last sigma of zero, whatever the base config
    says otherwise: the sampling our ``sample_latents`` reproduces."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(
        config, timestep_spacing="trailing", prediction_type=prediction, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete", final_sigmas_type="zero",
        rescale_betas_zero_snr=False, interpolation_type="linear",
    )


def lora_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(A, B, relative error)`` with ``B @ A ≈ delta`` (conv weights flattened), by truncated SVD."""
    out = delta.shape[0]
    mat = delta.reshape(out, -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    b, a = u[:, :r] * s[:r], vh[:r]
    err = float((mat - b @ a).norm() / mat.norm()) if mat.norm() > 0 else 0.0
    if delta.ndim == 4:
        a = a.reshape(r, *delta.shape[1:])
        b = b.reshape(out, r, 1, 1)
    return a.float().contiguous(), b.float().contiguous(), err


def extract_lora(loaded: LoadedRecipe, trained: dict[str, Tensor], rank: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """peft-format LoRA (``unet.NAME.lora_A.weight``/``lora_B``) of trained − base on the LCM-LoRA targets."""
    from .components.adapters import LoRA

    base = base_unet(loaded)
    excludes = {tuple(p.options["adapter"].config.exclude) for p in loaded.recipe.schedule.build().phases()
                if p.options["adapter"].name == "lora"}
    exclude = list(next(iter(excludes))) if len(excludes) == 1 else LoRA.Config().exclude  # the run's own rule
    targets = LoRA(LoRA.Config(rank=rank, exclude=exclude)).targets(base)
    base_state = base.state_dict()
    lora: dict[str, Tensor] = {}
    errors, untouched = [], 0.0
    target_weights = {f"{t}.weight" for t in targets}
    for key, value in base_state.items():
        new = trained[key].float()
        if key in target_weights:
            delta = new - value.float()
            if delta.abs().max() <= 1e-12:
                continue
            a, b, err = lora_factors(delta, rank)
            name = key[: -len(".weight")]
            lora[f"unet.{name}.lora_A.weight"] = a
            lora[f"unet.{name}.lora_B.weight"] = b
            errors.append(err)
        else:
            untouched = max(untouched, float((new - value.float()).abs().max()))
    info = {
        "rank": rank,
        "layers": len(errors),
        "max_relative_error": max(errors, default=0.0),
        "max_change_outside_lora": untouched,
    }
    if info["max_relative_error"] > 1e-3:
        log.warning(
            "LoRA export: rank %d leaves a relative error of up to %.3g (the merged LoRAs of the run add up to a "
            "higher rank); pass a larger --rank, or export --format diffusers for the exact weights",
            rank, info["max_relative_error"],
        )
    if untouched > 0:
        log.warning(
            "LoRA export: weights outside the LoRA targets changed (up to %.3g) and are not in the LoRA; "
            "export --format diffusers keeps them", untouched,
        )
    return lora, info


def to_comfyui(lora: dict[str, Tensor]) -> dict[str, Tensor]:
    """kohya/ComfyUI names: ``lora_unet_<path with _>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha``."""
    out: dict[str, Tensor] = {}
    for key, value in lora.items():
        name, kind = key[len("unet.") :].rsplit(".lora_", 1)
        base = "lora_unet_" + name.replace(".", "_")
        if kind == "A.weight":
            out[f"{base}.lora_down.weight"] = value
            out[f"{base}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: scale 1
        else:
            out[f"{base}.lora_up.weight"] = value
    return out


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


def _write_atomically(out: Path, write: Any) -> None:
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".old-{out.name}")
    if out.exists():  # an earlier export: set aside, then removed once the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export(run_dir: Path, fmt: Format, out: Path, stage: str | None = None, rank: int = 64) -> dict[str, Any]:
    """Write the chosen phase of ``run_dir`` to ``out`` in ``fmt``; returns what was written."""
    run_dir = Path(run_dir)
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    loaded = load_run(run_dir)
    out = check_out(Path(out), run_dir)
    phase = pick_phase(run_dir, loaded, stage)
    if loaded.recipe.method.name == "diffusion":  # a base model trained from scratch: the UNet and its scheduler
        if fmt != "diffusers":
            raise UserError(f"{run_dir} trained a model from scratch (method diffusion); export it with --format diffusers")
        from .components.pretrain import export_unet

        base = {"phase": phase.name, "steps": None, "prediction": loaded.recipe.method.config.prediction,
                "format": fmt, "run": str(run_dir.resolve())}

        def write_base(tmp: Path) -> None:
            export_unet(load_file(str(_artifact(run_dir, phase))), loaded.recipe.method.config, tmp)
            (tmp / "lightning_distill.json").write_text(json.dumps(base, indent=2))

        _write_atomically(Path(out), write_base)
        return base
    prediction = prediction_of(loaded, phase)
    steps = phase.options["student_steps"]
    state = {k[len("unet.") :]: v for k, v in student_state(run_dir, phase).items() if k.startswith("unet.")}
    pretrained, _ = _unet_source(loaded)
    meta = {"base": pretrained, "phase": phase.name, "stage": phase.stage, "steps": steps, "prediction": prediction,
            "format": fmt, "run": str(run_dir.resolve())}

    def write(tmp: Path) -> None:
        if fmt == "diffusers":
            unet = base_unet(loaded)
            unet.load_state_dict(state)
            unet.save_pretrained(tmp / "unet")
            scheduler_for(loaded, prediction).save_pretrained(tmp / "scheduler")
        else:
            lora, info = extract_lora(loaded, state, rank)
            meta.update(info)
            save_file(to_comfyui(lora) if fmt == "comfyui" else lora, str(tmp / LORA_FILE), metadata={"format": "pt"})
        (tmp / "lightning_distill.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(model_card(meta, (run_dir / "recipe.yaml").read_text()))

    _write_atomically(Path(out), write)
    return meta


def model_card(meta: dict[str, Any], recipe: str) -> str:
    steps, pred = meta["steps"], meta["prediction"]
    sched = f'EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", prediction_type="{pred}")'
    if meta["format"] == "diffusers":
        load = (
            f'unet = UNet2DConditionModel.from_pretrained("THIS_FOLDER", subfolder="unet")\n'
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{meta["base"]}", unet=unet)'
        )
    else:
        load = (
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{meta["base"]}")\n'
            f'pipe.load_lora_weights("THIS_FOLDER", weight_name="{LORA_FILE}")\npipe.fuse_lora()'
        )
    comfy = (
        "\nComfyUI: put the LoRA file in `models/loras`, load it with *LoraLoader*, and sample with KSampler "
        f"(sampler `euler`, scheduler `sgm_uniform`, {steps} steps, CFG 1).\n"
        if meta["format"] == "comfyui"
        else ""
    )
    return f"""# {meta['phase']} — a {steps}-step model distilled with lightning-distill

Distilled from `{meta['base']}` by progressive adversarial diffusion distillation (SDXL-Lightning,
arXiv 2402.13929); phase `{meta['phase']}` of stage `{meta['stage']}`, prediction type `{pred}`.

## Sampling

{steps} steps, Euler with **trailing** timestep spacing, **no** classifier-free guidance:

```python
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

{load}
pipe.scheduler = {sched}
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale=0).images[0]
```
{comfy}
## Recipe

```yaml
{recipe}```
"""
