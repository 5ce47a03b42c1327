"""``sample``: image grids from a run (the one sampler, through the method's phase model) or an exported model
(the diffusers pipeline)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from lightning_distill.codecs.base import batch_conditioning, batch_latents, prompt_conditioning
from lightning_distill.errors import UserError
from lightning_distill.export.lora import LORA_FILE
from lightning_distill.utils.images import image_grid, to_unit


def sample_run(
    run_dir: Path, prompts: list[str], steps: int | None = None, seed: int = 0, size: int | None = None,
    stage: str | None = None,
) -> Tensor:
    """Images ``[N, 3, H, W]`` in ``[0, 1]`` from a run's last (or ``stage``'s) student, with our sampler."""
    from lightning_distill.run_folder import RunFolder

    run = RunFolder(Path(run_dir))
    recipe = run.recipe
    device = _device()
    codec = recipe.codec.build().to(device)
    model = run.phase_model(run.pick(stage))
    model.denoiser.to(device)
    if codec.has_text:
        if not prompts:
            raise UserError("give at least one --prompt")
        size = size or getattr(recipe.data.config, "resolution", 1024)
        cond = prompt_conditioning(codec, prompts, size, size, device)
        f = codec.scale_factor
        shape: tuple[int, ...] = (len(prompts), model.latent_channels, size // f, size // f)
    else:
        if prompts:
            raise UserError(f"{run_dir}: this run's codec has no text encoder; sample without --prompt "
                            "(conditioning then comes from the run's data)")
        from torch.utils.data import default_collate

        data = recipe.data.build(seed=recipe.seed)
        batch = default_collate([data[i] for i in range(min(8, len(data)))])
        cond = {k: v.to(device) for k, v in batch_conditioning(batch, codec).items()}
        shape = tuple(batch_latents(batch, codec).shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)  # drawn on the CPU, as diffusers
    return to_unit(codec.decode(model.sample(noise, cond, steps)))


def sample_exported(model_dir: Path, prompts: list[str], steps: int | None = None, seed: int = 0,
                    size: int | None = None, base: str | None = None) -> Tensor:
    """Images from an ``export`` folder through its family's diffusers pipeline (``StableDiffusionXLPipeline``,
    ``StableDiffusionPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``), at ``size`` pixels (default: the
    resolution the run trained at, as the export records it; else the pipeline's own default)."""
    import diffusers

    meta_file = Path(model_dir) / "lightning_distill.json"
    if not meta_file.is_file():
        raise UserError(f"{model_dir}: not an export folder or run folder (no lightning_distill.json or recipe.yaml)")
    meta = json.loads(meta_file.read_text())
    if not prompts:
        raise UserError("give at least one --prompt")
    base = base or meta["base"]
    pipeline = getattr(diffusers, meta.get("pipeline") or "StableDiffusionXLPipeline")
    folder = meta.get("network_folder", "unet")
    steps = steps or meta["steps"]
    flow = meta["prediction"] == "flow"
    if meta["format"] == "diffusers":
        network = getattr(diffusers, meta.get("network_class", "UNet2DConditionModel"))
        pipe = pipeline.from_pretrained(base, **{folder: network.from_pretrained(str(Path(model_dir) / folder))})
        scheduler_dir = Path(model_dir) / "scheduler"
        scheduler_class = getattr(diffusers, json.loads((scheduler_dir / "scheduler_config.json").read_text())["_class_name"])
        pipe.scheduler = scheduler_class.from_pretrained(str(scheduler_dir))
    else:
        if not hasattr(pipeline, "load_lora_weights"):
            raise UserError(f"{model_dir}: {pipeline.__name__} has no load_lora_weights, so this LoRA export cannot "
                            "be loaded into it; export the run with --format diffusers (merged weights) instead")
        pipe = pipeline.from_pretrained(base)
        pipe.load_lora_weights(str(model_dir), weight_name=LORA_FILE)
        pipe.fuse_lora()
        if not flow:
            from lightning_distill.models.teacher import lightning_scheduler

            pipe.scheduler = lightning_scheduler(pipe.scheduler.config, meta["prediction"])
    pipe.set_progress_bar_config(disable=True)
    pipe.to(_device())
    extra = {}
    if flow:
        from lightning_distill.models.noise import trailing_sigmas

        extra["sigmas"] = trailing_sigmas(steps, pipe.scheduler.config.num_train_timesteps)
    extra.update(meta.get("pipeline_call") or {})  # the family's own call arguments, recorded by export
    size = size or meta.get("resolution")
    if size:
        extra.update(height=size, width=size)
    out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=meta.get("guidance") or 0.0, generator=torch.Generator().manual_seed(seed), output_type="pt", **extra)
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
