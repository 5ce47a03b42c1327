"""Plain diffusion training of a denoiser from scratch (how the tiny world's teacher is made), in the same loop.

The ``diffusion`` method trains a fresh diffusers ``UNet2DConditionModel`` with the usual denoising loss and
classifier-free-guidance dropout; the ``single`` schedule is one phase of it. ``export --format diffusers`` of
such a run writes ``unet/`` and ``scheduler/``, which the ``unet`` teacher loads with ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_distill.engine.artifacts import full_state_dict
from lightning_distill.config.fields import NonNegativeFloat, PositiveInt, component
from lightning_distill.models.noise import FlowMatchSchedule, Prediction
from lightning_distill.errors import UserError
from lightning_distill.methods.base import ArtifactLoader, Method, Phase, PhaseFacts, PhaseModel
from lightning_distill.utils.images import to_unit
from lightning_distill.utils.pretrained import load_pretrained
from lightning_distill.utils.tensors import strip_prefix
from lightning_distill.config.registry import METHODS
from lightning_distill.codecs.base import batch_conditioning, batch_latents
from lightning_distill.models.sd3.network import SD3Denoiser
from lightning_distill.models.sdxl.network import UNetDenoiser


def build_unet(config: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    try:
        return UNet2DConditionModel(**config)
    except TypeError as err:
        raise UserError(f"method.unet: not a UNet2DConditionModel configuration: {err}") from err


def build_transformer(config: dict[str, Any]) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    try:
        return SD3Transformer2DModel(**config)
    except TypeError as err:
        raise UserError(f"method.transformer: not an SD3Transformer2DModel configuration: {err}") from err


@METHODS.register("diffusion")
class DiffusionTraining(Method):
    """Train a ``UNet2DConditionModel`` or an SD3-shaped transformer from scratch to denoise the data's latents
    given its captions (on a discrete or a flow-matching schedule)."""

    @dataclass(kw_only=True)
    class Config:
        unet: dict[str, Any] | None = None
        """Arguments of ``diffusers.UNet2DConditionModel`` (block_out_channels, cross_attention_dim, ...)."""
        transformer: dict[str, Any] | None = None
        """Instead of ``unet``: arguments of ``diffusers.SD3Transformer2DModel`` (an MMDiT; with a flow_match
        schedule and prediction flow, an SD3-shaped model the ``sd3`` teacher loads)."""
        prediction: Prediction = "epsilon"
        noise_schedule: component("noise_schedule") = field(default_factory=lambda: {"name": "discrete"})  # type: ignore[valid-type]
        """discrete (betas; the default) or flow_match (with prediction: flow)."""
        caption_dropout: NonNegativeFloat = 0.1
        """Fraction of captions replaced by the empty caption (zero embedding), for classifier-free guidance."""
        preview_steps: PositiveInt = 32
        preview_guidance: float = 3.0
        preview_size: PositiveInt = 8
        init: str | None = None
        """A diffusers folder (as ``export --format diffusers`` writes it) whose ``unet/`` or ``transformer/``
        weights start the training instead of a random network: training a teacher further. Its network must have
        the configuration given above."""

    @staticmethod
    def check(config: Config, phases: list[Phase]) -> None:
        if [n for p in phases for n in p.optimizers] != ["model"] * len(phases):
            raise UserError("method diffusion trains one module named 'model'; use schedule 'single'")
        try:
            config.noise_schedule.build().check_prediction(config.prediction)
        except ValueError as err:
            raise UserError(f"method.prediction: {err}") from err
        if (config.unet is None) == (config.transformer is None):
            raise UserError("method: give exactly one of unet and transformer (the network to train)")
        if config.caption_dropout > 1:
            raise UserError(f"method.caption_dropout must lie in [0, 1], got {config.caption_dropout}")

    def __init__(self, config: Config, *, phases: list[Phase], codec: nn.Module, seed: int = 0) -> None:
        self.config = config
        self.phases = phases
        self.codec = codec
        self.seed = seed
        self.schedule = config.noise_schedule.build()

    def build_phase(self, phase: Phase, artifacts: ArtifactLoader, empty: bool = False) -> dict[str, nn.Module]:
        self.phase = phase
        with torch.device("meta" if empty else "cpu"):
            denoiser = self._denoiser()
        if self.config.init is not None and not empty:
            self._load_init(denoiser)
        return {"model": denoiser.train()}

    def _load_init(self, denoiser: nn.Module) -> None:
        """Copy ``init``'s network (loaded as teachers are, ``from_pretrained``) into the configured one."""
        kind = "transformer" if self.config.transformer is not None else "unet"
        network = denoiser.network
        try:
            state = load_pretrained(type(network), self.config.init, kind).state_dict()
        except UserError as err:
            raise UserError(f"method.init: {err}; give a folder written by 'lightning-distill export --format "
                            "diffusers' (or a diffusers pipeline folder)") from err
        own = network.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise UserError(f"method.init: the weights in {Path(self.config.init) / kind} do not fit the network of "
                            f"method.{kind} (missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes "
                            f"{wrong[:3]}); give the configuration the folder was trained with")
        network.load_state_dict(state)  # copies into the network's own dtype

    def _denoiser(self) -> nn.Module:
        if self.config.transformer is not None:
            return SD3Denoiser(build_transformer(self.config.transformer), self.schedule)
        return UNetDenoiser(build_unet(self.config.unet), self.schedule)

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

    def facts(self, phase: Phase) -> PhaseFacts:
        return PhaseFacts(phase.stage, phase.kind, self.config.prediction)

    def phase_model(self, facts: PhaseFacts | None, artifact: dict[str, Tensor] | None) -> PhaseModel:
        """The trained UNet (float16 when exported) with its DDPM scheduler."""
        denoiser = self._denoiser()
        if artifact is not None:
            denoiser.load_state_dict(strip_prefix(artifact, "model."))
        return self._model(denoiser, facts or PhaseFacts("diffusion", "diffusion", self.config.prediction))

    def _model(self, denoiser: UNetDenoiser, facts: PhaseFacts) -> PhaseModel:
        def scheduler() -> Any:
            if isinstance(self.schedule, FlowMatchSchedule):
                return self.schedule.scheduler()
            return self.schedule.scheduler(self.config.prediction)

        transformer = isinstance(denoiser, SD3Denoiser)
        return PhaseModel(facts, denoiser, self.schedule, denoiser.in_channels, network=denoiser.network,
                          scheduler=scheduler, export_dtype="float16",
                          network_folder="transformer" if transformer else "unet",
                          pipeline="StableDiffusion3Pipeline" if transformer else None)

    @torch.no_grad()
    def preview(self, batch: dict) -> Tensor:
        latents, cond = self._inputs(batch)
        n = min(self.config.preview_size, latents.shape[0])
        cond = {k: v[:n] for k, v in cond.items()}
        noise = torch.randn(latents[:n].shape, generator=torch.Generator().manual_seed(self.seed)).to(latents)
        model = self.modules["model"]
        was_training = model.training
        model.eval()
        facts = PhaseFacts(self.phase.stage, self.phase.kind, self.config.prediction, self.config.preview_steps)
        x = self._model(model, facts).sample(noise, cond, guidance=self.config.preview_guidance)
        model.train(was_training)
        return to_unit(self.codec.decode(x))
