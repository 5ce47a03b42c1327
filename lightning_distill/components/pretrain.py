"""Plain diffusion training of a denoiser from scratch (how the tiny world's teacher is made), in the same loop.

The ``diffusion`` method trains a fresh diffusers ``UNet2DConditionModel`` with the usual denoising loss and
classifier-free-guidance dropout; the ``single`` schedule is one phase of it. ``export --format diffusers`` of
such a run writes ``unet/`` and ``scheduler/``, which the ``unet`` teacher loads with ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checkpoint import full_state_dict
from ..config import NonNegativeFloat, PositiveInt
from ..diffusion import NoiseSchedule, NoiseScheduleConfig
from ..errors import UserError
from ..method import ArtifactLoader, Method, OptimizerSettings, Phase, chain_phases
from ..registry import METHODS, SCHEDULES
from .codecs import batch_conditioning, batch_latents
from .sdxl import UNetDenoiser
from .teacher import guided


@SCHEDULES.register("single")
class Single:
    """One phase of ``steps`` optimizer steps (plain training, no stages)."""

    @dataclass(kw_only=True)
    class Config:
        steps: PositiveInt
        lr: NonNegativeFloat = 1e-4
        betas: tuple[float, float] = (0.9, 0.999)
        weight_decay: NonNegativeFloat = 0.0
        kind: str = "diffusion"
        module: str = "model"
        """The name of the trained module (its optimizer is named after it)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def phases(self) -> list[Phase]:
        c = self.config
        settings = OptimizerSettings(c.lr, c.betas, c.weight_decay)
        return chain_phases([(c.kind, c.kind, c.kind, c.steps, {c.module: settings}, {})])


def build_unet(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel(**config)
    except TypeError as err:
        raise UserError(f"method.unet: not a UNet2DConditionModel configuration: {err}") from err


@METHODS.register("diffusion")
class DiffusionTraining(Method):
    """Train a ``UNet2DConditionModel`` from scratch to denoise the data's latents given its captions."""

    @dataclass(kw_only=True)
    class Config:
        unet: dict[str, Any]
        """Arguments of ``diffusers.UNet2DConditionModel`` (block_out_channels, cross_attention_dim, ...)."""
        prediction: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
        noise_schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
        caption_dropout: NonNegativeFloat = 0.1
        """Fraction of captions replaced by the empty caption (zero embedding), for classifier-free guidance."""
        preview_steps: PositiveInt = 32
        preview_guidance: float = 3.0
        preview_size: PositiveInt = 8

    @staticmethod
    def check(config: Config, phases: list[Phase]) -> None:
        if [n for p in phases for n in p.optimizers] != ["model"] * len(phases):
            raise UserError("method diffusion trains one module named 'model'; use schedule 'single'")
        if config.caption_dropout > 1:
            raise UserError(f"method.caption_dropout must lie in [0, 1], got {config.caption_dropout}")

    def __init__(self, config: Config, *, phases: list[Phase], codec: nn.Module, seed: int = 0) -> None:
        self.config = config
        self.phases = phases
        self.codec = codec
        self.seed = seed
        self.schedule = NoiseSchedule(config.noise_schedule)

    def build_phase(self, phase: Phase, artifacts: ArtifactLoader, empty: bool = False) -> dict[str, nn.Module]:
        self.phase = phase
        with torch.device("meta" if empty else "cpu"):
            return {"model": UNetDenoiser(build_unet(self.config.unet)).train()}

    def artifact(self) -> dict[str, dict[str, Tensor]]:
        return {"model": full_state_dict(self.modules["model"])}

    def _inputs(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        return batch_latents(batch, self.codec), batch_conditioning(batch, self.codec)

    @torch.no_grad()
    def prepare(self, batch: dict, step: int) -> dict:
        latents, cond = self._inputs(batch)
        B = latents.shape[0]
        drop = torch.rand(B, device="cpu") < self.config.caption_dropout
        drop = drop.to(latents.device)
        cond = {k: torch.where(drop.reshape(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v) for k, v in cond.items()}
        t = torch.randint(0, self.schedule.T, (B,), device="cpu").to(latents.device)
        noise = torch.randn_like(latents)
        x_t = self.schedule.add_noise(latents, noise, t)
        target = self.schedule.target(latents, noise, t, self.config.prediction)
        return {"x_t": x_t, "t": t, "cond": cond, "target": target}

    def training_step(self, batch: dict, optimizer: str) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.modules["model"](batch["x_t"], batch["t"], batch["cond"])
        loss = F.mse_loss(out.float(), batch["target"].float())
        return loss, {"loss/diffusion": loss.detach()}

    @torch.no_grad()
    def preview(self, batch: dict) -> Tensor:
        from ..sampling import sample_latents

        latents, cond = self._inputs(batch)
        n = min(self.config.preview_size, latents.shape[0])
        cond = {k: v[:n] for k, v in cond.items()}
        noise = torch.randn(latents[:n].shape, generator=torch.Generator().manual_seed(self.seed)).to(latents)
        model = self.modules["model"]
        was_training = model.training
        model.eval()
        x = sample_latents(guided(model, self.config.preview_guidance), self.schedule, self.config.prediction, noise,
                           cond, self.config.preview_steps)
        model.train(was_training)
        return ((self.codec.decode(x)[:, :3].float().clamp(-1, 1) + 1) / 2).cpu()


def export_unet(state: dict[str, Tensor], config: DiffusionTraining.Config, out: Path, dtype: str = "float16") -> None:
    """A diffusion run's ``model`` artifact as a diffusers folder: ``unet/`` (weights in ``dtype``), ``scheduler/``."""
    from diffusers import DDPMScheduler

    unet = build_unet(config.unet)
    unet.load_state_dict({k[len("model.unet.") :]: v for k, v in state.items() if k.startswith("model.unet.")})
    unet.to(getattr(torch, dtype)).save_pretrained(str(out / "unet"))
    s = config.noise_schedule
    DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                  beta_schedule=s.beta_schedule, prediction_type=config.prediction).save_pretrained(str(out / "scheduler"))
