"""The frozen teacher: a denoiser, its noise schedule, classifier-free guidance and a multi-step DDIM sampler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_distill.config.fields import component
from lightning_distill.errors import UserError
from lightning_distill.models.architectures import network_config
from lightning_distill.utils.pretrained import load_pretrained
from lightning_distill.utils.tensors import DTYPES, Dtype
from lightning_distill.models.noise import Prediction, Schedule


def null_cond(cond: dict[str, Tensor], null: dict[str, Tensor] | None = None,
              keeps: tuple[str, ...] = ("time_ids",)) -> dict[str, Tensor]:
    """The unconditional input for guidance: ``null`` (the empty caption's encoding, one row, for codecs whose
    pipeline encodes it: SD1.5, SD3) broadcast to the batch, else zeros (SDXL's ``force_zeros_for_empty_prompt``).
    The entries in ``keeps`` (the codec's ``null_keeps``: ``time_ids``, a plugin's masks or sizes) stay as they are."""
    if null is not None:
        return {k: (null[k].to(v).expand_as(v) if k in null and k not in keeps else v) for k, v in cond.items()}
    return {k: (v if k in keeps else torch.zeros_like(v)) for k, v in cond.items()}


def guided(denoiser: Any, scale: float, null: dict[str, Tensor] | None = None,
           keeps: tuple[str, ...] = ("time_ids",)) -> Any:
    """``denoiser`` with classifier-free guidance at ``scale`` (> 1; otherwise ``denoiser`` itself): one batched
    call on the null (see :func:`null_cond`) and the real conditioning, ``out_u + scale (out_c - out_u)``."""
    if scale <= 1.0:
        return denoiser

    def run(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        uncond = null_cond(cond, null, keeps)
        both = {k: torch.cat([uncond[k], v]) for k, v in cond.items()}
        out_u, out_c = denoiser(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_u + scale * (out_c - out_u)

    return run


@dataclass(kw_only=True)
class PretrainedTeacherConfig:
    """Where a diffusers teacher's network comes from, and how it is held."""

    pretrained: str
    """Local pipeline folder or hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0)."""
    subfolder: str = "unet"
    variant: str | None = None
    """e.g. fp16, for ``diffusion_pytorch_model.fp16.safetensors``."""
    dtype: Dtype = "float32"
    """Weights of the frozen teacher (bfloat16 halves its memory)."""
    noise_schedule: component("noise_schedule") | None = None  # type: ignore[valid-type]
    """None: the folder's ``scheduler/`` config, else the family's default."""
    prediction: Literal["epsilon", "sample", "v_prediction"] | None = None
    """On a discrete schedule: what the network predicts (None: the scheduler config's prediction_type, else
    epsilon). Flow-matching networks predict ``flow`` and ignore it."""


def load_network(cls: Any, config: PretrainedTeacherConfig, empty: bool = False) -> nn.Module:
    """The network of ``config`` (``cls.from_pretrained``); with ``empty``, its architecture alone on the caller's
    device context (meta), no weights read."""
    if empty:
        net = cls.from_config(network_config(cls, config.pretrained, config.subfolder))
        # torch's own cast: diffusers' override adds only a warning, printed even with no module kept in fp32
        return nn.Module.to(net, DTYPES[config.dtype])
    return load_pretrained(cls, config.pretrained, config.subfolder, variant=config.variant,
                           torch_dtype=DTYPES[config.dtype])


def lightning_scheduler(config: Any, prediction: str) -> Any:
    """Euler on the discrete schedule with trailing spacing and a last sigma of zero, whatever the base config
    says otherwise: the sampling our ``sample_latents`` reproduces."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(
        config, timestep_spacing="trailing", prediction_type=prediction, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete", final_sigmas_type="zero",
        rescale_betas_zero_snr=False, interpolation_type="linear",
    )


@dataclass(frozen=True)
class PretrainedSource:
    """Where a teacher's network was loaded from (what an export of its students builds on)."""

    pretrained: str
    subfolder: str
    variant: str | None = None
    dtype: str = "float32"


def _is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 sharded ``module`` (``fully_shard`` makes it an ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class SamplerTeacher(nn.Module):
    """Frozen ``denoiser(x, t, cond) -> prediction`` with a DDIM/Euler sampler over given timesteps.

    Calling the teacher samples (``forward`` is the sampler), so strategies that hook ``forward`` (FSDP2) see
    the whole multi-step solve as one call.

    Args:
        denoiser: the network; it is frozen here (``requires_grad_(False)``, eval mode).
        prediction: what the network predicts: epsilon, sample or v_prediction.
        schedule: the training schedule of the network (discrete or flow matching).
    """

    def __init__(self, denoiser: nn.Module, *, prediction: str, schedule: Schedule) -> None:
        super().__init__()
        try:
            schedule.check_prediction(prediction)
        except ValueError as err:
            raise UserError(f"method.teacher: {err}") from err
        self.denoiser = denoiser.requires_grad_(False).eval()
        self.prediction: Prediction = prediction  # type: ignore[assignment]
        self.schedule = schedule
        self.null_keeps: tuple[str, ...] = ("time_ids",)
        """Conditioning entries guidance leaves as they are (the codec's ``null_keeps``, set by the method)."""

    source: PretrainedSource | None = None
    """The diffusers folder or hub id the network came from; None: built by code (no export format)."""
    pipeline_class: str | None = None
    """The diffusers pipeline its exports plug into (e.g. ``StableDiffusionXLPipeline``)."""
    pipeline_call: dict[str, Any] = {}
    """Extra arguments ``sample`` of an export gives the family's pipeline call, where its defaults would render
    other images than the run's sampler (e.g. ``{"use_resolution_binning": False}``); written into the export."""
    network_folder: str = "unet"
    """The pipeline's folder (and LoRA key prefix) of the network: ``unet`` or ``transformer``."""
    embedded_guidance: float = 0.0
    """The guidance value a guidance-distilled network (Flux) is always given; the pipeline's guidance_scale."""

    def sampling_scheduler(self, prediction: str) -> Any:
        """The diffusers scheduler that samples this network's students (export writes its config)."""
        raise UserError(f"{type(self).__name__} has no diffusers scheduler; export needs a teacher that implements "
                        "sampling_scheduler(prediction) (returning the diffusers scheduler that samples its students), "
                        "as the sdxl, unet, sd15, sd3 and flux teachers do")

    def train(self, mode: bool = True) -> SamplerTeacher:
        return super().train(False)  # frozen: dropout and norms stay in eval mode

    def fsdp_units(self) -> list[nn.Module]:
        units = getattr(self.denoiser, "fsdp_units", None)
        return units() if units else []

    def predict(
        self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance: float = 0.0, null: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x0, ε)`` at ``t``, with classifier-free guidance when ``guidance > 1`` (``null``: see ``null_cond``)."""
        out = guided(self.denoiser, guidance, null, self.null_keeps)(x, t, cond)
        return self.schedule.split(out.to(x.dtype), x, t, self.prediction)

    def forward(
        self, x: Tensor, timesteps: Tensor, cond: dict[str, Tensor], guidance: float = 0.0,
        null: dict[str, Tensor] | None = None, *, raw: bool = False,
    ) -> Tensor:
        """Solve from ``timesteps[:, 0]`` to ``timesteps[:, -1]`` through each column (``-1``: clean), without grad.

        Args:
            x: ``[B, C, H, W]`` at ``timesteps[:, 0]``.
            timesteps: ``[B, n + 1]`` integer timesteps, decreasing along each row.
            raw: instead, the network's raw output at ``timesteps`` ``[B]``, with autograd (gradients reach ``x``):
                how a frozen-feature discriminator runs a sharded teacher, whose weights FSDP2 gathers around
                this call (the root module's forward).
        """
        if raw:
            return self.denoiser(x, timesteps, cond)
        # inference mode where it is safe: not in compiled code, and not on a sharded teacher, whose FSDP2 buffers
        # would become inference tensors that a later forward with autograd (raw) cannot write
        inference = not torch.compiler.is_compiling() and not _is_sharded(self)
        with torch.no_grad(), torch.inference_mode(inference):
            for i in range(timesteps.shape[1] - 1):
                x0, eps = self.predict(x, timesteps[:, i], cond, guidance, null)
                x = self.schedule.step(x0, eps, timesteps[:, i + 1])
        return x.clone()  # outside inference mode: a normal tensor, usable as a target in autograd
