"""``sample``: image grids from a run (our sampler) or an exported model (the diffusers pipeline).

Our sampler follows diffusers' trailing-spacing Euler exactly, starting point included: diffusers starts at
``noise * sigma_max`` in σ-space, which is ``noise * sqrt(1 - ᾱ_T)`` in variance-preserving space.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .diffusion import NoiseSchedule
from .errors import UserError
from .images import image_grid


@torch.no_grad()
def sample_latents(
    denoiser: Any, schedule: NoiseSchedule, prediction: str, noise: Tensor, cond: dict[str, Tensor], steps: int
) -> Tensor:
    """``steps`` Euler/DDIM steps on trailing timesteps from ``noise`` (as diffusers draws it) to clean latents."""
    ts = [*schedule.timesteps(steps, "trailing"), -1]
    x = noise * (1 - schedule.alpha_bar(torch.tensor(ts[0]))).sqrt().to(noise.dtype)
    for t, t_prev in zip(ts[:-1], ts[1:]):
        tt = torch.full((x.shape[0],), t, device=x.device)
        x0, eps = schedule.split(denoiser(x, tt, cond).to(x.dtype), x, tt, prediction)  # type: ignore[arg-type]
        x = schedule.step(x0, eps, torch.full((x.shape[0],), t_prev, device=x.device))
    return x


def sample_run(
    run_dir: Path, prompts: list[str], steps: int | None = None, seed: int = 0, size: int | None = None,
    stage: str | None = None,
) -> Tensor:
    """Images ``[N, 3, H, W]`` in ``[0, 1]`` from a run's last (or ``stage``'s) student, with our sampler."""
    from .export import load_run, pick_phase, prediction_of, student_state

    run_dir = Path(run_dir)
    loaded = load_run(run_dir)
    recipe = loaded.recipe
    phase = pick_phase(run_dir, loaded, stage)
    device = _device()
    teacher = recipe.method.config.teacher.build(seed=recipe.seed)
    teacher.denoiser.load_state_dict(student_state(run_dir, phase))
    teacher.to(device)
    codec = recipe.codec.build().to(device)
    steps = steps or phase.options["student_steps"]
    if hasattr(codec, "encode_text"):
        if not prompts:
            raise UserError("give at least one --prompt")
        from .components.codecs import prompt_conditioning

        size = size or getattr(recipe.data.config, "resolution", 1024)
        cond = prompt_conditioning(codec, prompts, size, size, device)
        f = getattr(codec, "scale_factor", 1)  # pixels per latent (1: pixel space)
        shape = (len(prompts), teacher.denoiser.unet.config.in_channels, size // f, size // f)
    else:
        if prompts:
            raise UserError(f"{run_dir}: this run's codec has no text encoder; sample without --prompt "
                            "(conditioning then comes from the run's data)")
        from torch.utils.data import default_collate

        data = recipe.data.build(seed=recipe.seed)
        batch = default_collate([data[i] for i in range(min(8, len(data)))])
        cond = {k: v.to(device) for k, v in batch.items() if k not in ("latents", "pixels", "caption")}
        shape = tuple(batch["latents"].shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)  # drawn on the CPU, as diffusers
    latents = sample_latents(teacher.denoiser, teacher.schedule, prediction_of(loaded, phase), noise, cond, steps)
    return ((codec.decode(latents)[:, :3].float().clamp(-1, 1) + 1) / 2).cpu()


def sample_exported(model_dir: Path, prompts: list[str], steps: int | None = None, seed: int = 0,
                    size: int = 1024, base: str | None = None) -> Tensor:
    """Images from an ``export`` folder through diffusers' ``StableDiffusionXLPipeline``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    meta_file = Path(model_dir) / "lightning_distill.json"
    if not meta_file.is_file():
        raise UserError(f"{model_dir}: not an export folder or run folder (no lightning_distill.json or recipe.yaml)")
    meta = json.loads(meta_file.read_text())
    if not prompts:
        raise UserError("give at least one --prompt")
    base = base or meta["base"]
    if meta["format"] == "diffusers":
        unet = UNet2DConditionModel.from_pretrained(str(Path(model_dir) / "unet"))
        pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet)
        pipe.scheduler = EulerDiscreteScheduler.from_pretrained(str(Path(model_dir) / "scheduler"))
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(base)
        pipe.load_lora_weights(str(model_dir), weight_name="pytorch_lora_weights.safetensors")
        pipe.fuse_lora()
        from .export import lightning_scheduler

        pipe.scheduler = lightning_scheduler(pipe.scheduler.config, meta["prediction"])
    pipe.set_progress_bar_config(disable=True)
    pipe.to(_device())
    out = pipe(prompt=prompts, num_inference_steps=steps or meta["steps"], guidance_scale=0.0, height=size,
               width=size, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return out.images.float().cpu()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_output(path: Path, size: int | None) -> None:
    """Mistakes in ``--out``/``--size`` are caught before any sampling."""
    from PIL import Image

    if Path(path).suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {path}: give an image file name such as grid.png")
    if size is not None and (size < 8 or size % 8):
        raise UserError(f"--size must be a positive multiple of 8, got {size}")


def save_grid(images: Tensor, path: Path) -> None:
    from PIL import Image

    grid = image_grid(images)
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
