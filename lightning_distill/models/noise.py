"""The noise-schedule role: discrete variance-preserving betas and flow matching, parameterisations and the one
solver step, as pure tensor functions.

Timesteps are integers in ``[0, T)``; ``t_prev = -1`` means the clean end of the trajectory (a = 1, s = 0).
DDIM (η = 0) in variance-preserving space, Euler in σ-space (``x / sqrt(ᾱ)``) and the flow-matching Euler step
are all ``a' x0 + s' ε``, so one solver serves every sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_distill.config.registry import NOISE_SCHEDULES

Prediction = Literal["epsilon", "sample", "v_prediction", "flow"]
"""What a network predicts: ε, x0, v (``sqrt(ᾱ) ε - sqrt(1-ᾱ) x0``, variance-preserving schedules) or the flow
velocity ``ε - x0`` (flow matching)."""


class Schedule:
    """A noise schedule: ``x_t = a(t) x0 + s(t) ε`` at integer timesteps ``t`` in ``[0, T)`` (``-1``: clean, a = 1,
    s = 0), conversions between parameterisations, and the one solver step.

    Every schedule shares the integer grid, so the ladder, trailing spacing and teacher paths work unchanged on
    any of them; a schedule says what ``t`` means (its coefficients, and the time its network is given).
    """

    T: int

    def coefficients(self, t: Tensor, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(a, s)`` at ``t`` as float64, shaped like ``t`` (``like``: the latents, for resolution-dependent
        schedules)."""
        raise NotImplementedError

    def model_time(self, t: Tensor, like: Tensor) -> Tensor:
        """The timestep the network was trained with at ``t`` (float32)."""
        return torch.as_tensor(t, device=like.device)

    def initial_scale(self, t: int, like: Tensor) -> float:
        """The factor on unit noise that starts diffusers' sampler at timestep ``t``."""
        raise NotImplementedError

    def log_snr(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """``log(a² / s²)`` at ``t``: the noise level, comparable across schedules."""
        a, s = self.coefficients(torch.as_tensor(t), like)
        return 2 * (a / s).log()

    def check_prediction(self, prediction: str) -> None:
        """Raise ``ValueError`` if this schedule cannot use ``prediction``."""

    def timesteps(self, n: int, spacing: Literal["trailing", "leading", "linspace"] = "trailing") -> list[int]:
        """The ``n`` sampling timesteps, first (noisiest) to last, as diffusers spaces them."""
        T = self.T
        if spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long() - 1
        elif spacing == "leading":
            ts = torch.arange(0, n, dtype=torch.float64).mul(T // n).round().long().flip(0)
        else:
            ts = torch.linspace(0, T - 1, n, dtype=torch.float64).round().long().flip(0)
        return ts.tolist()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor, *, pure_noise_at_T: bool = False) -> Tensor:
        """``x_t = a x0 + s ε``. With ``pure_noise_at_T``, ``x_{T-1} = ε``: SDXL's schedule never reaches pure
        noise, while sampling starts from it, so training swaps it in at the last timestep."""
        sa, s1a = self._coefs(t, x0)
        x_t = sa * x0 + s1a * noise
        if pure_noise_at_T:
            last = _bcast(torch.as_tensor(t, device=x0.device) == self.T - 1, x0)
            x_t = torch.where(last, noise, x_t)
        return x_t

    def split(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction: Prediction) -> tuple[Tensor, Tensor]:
        """``(x0, ε)`` implied by a network output under the given parameterisation."""
        self.check_prediction(prediction)
        sa, s1a = self._coefs(t, x_t)
        if prediction == "epsilon":
            eps = pred
            x0 = (x_t - s1a * eps) / sa
        elif prediction == "sample":
            x0 = pred
            eps = (x_t - sa * x0) / s1a
        elif prediction == "v_prediction":
            x0 = sa * x_t - s1a * pred
            eps = sa * pred + s1a * x_t
        elif prediction == "flow":  # a + s = 1: x0 = x_t - s v, ε = x_t + a v
            x0 = x_t - s1a * pred
            eps = x_t + sa * pred
        else:
            raise ValueError(f"unknown prediction type {prediction!r}")
        return x0, eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction: Prediction) -> Tensor:
        """The network output that would imply ``(x0, ε)`` at ``t``."""
        self.check_prediction(prediction)
        if prediction == "epsilon":
            return eps
        if prediction == "sample":
            return x0
        if prediction == "flow":
            return eps - x0
        sa, s1a = self._coefs(t, x0)
        return sa * eps - s1a * x0

    def step(self, x0: Tensor, eps: Tensor, t_prev: Tensor) -> Tensor:
        """One solver step to ``t_prev``: ``a' x0 + s' ε``. This is DDIM (η = 0), an Euler step in σ-space and,
        on a flow schedule, the flow-matching Euler step ``x + (σ' - σ) v``."""
        sa, s1a = self._coefs(t_prev, x0)
        return sa * x0 + s1a * eps

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, s)`` computed in float64, broadcast to ``like`` and cast to its dtype."""
        a, s = self.coefficients(torch.as_tensor(t, device=like.device), like)
        return _bcast(a, like).to(like.dtype), _bcast(s, like).to(like.dtype)


@dataclass(kw_only=True, frozen=True)
class NoiseScheduleConfig:
    """The discrete diffusion schedule (SDXL's by default)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"


@NOISE_SCHEDULES.register("discrete")
class NoiseSchedule(Schedule):
    """Variance-preserving discrete betas (SD1.5, SD2.x, SDXL): ``a = sqrt(ᾱ_t)``, ``s = sqrt(1 - ᾱ_t)``."""

    Config = NoiseScheduleConfig

    def __init__(self, config: NoiseScheduleConfig | None = None) -> None:
        self.config = config or NoiseScheduleConfig()
        c = self.config
        if c.beta_schedule == "scaled_linear":
            betas = torch.linspace(c.beta_start**0.5, c.beta_end**0.5, c.num_train_timesteps, dtype=torch.float64,
                                   device="cpu") ** 2  # a table on the CPU, even when modules are built on meta
        else:
            betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64, device="cpu")
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.T = c.num_train_timesteps
        self._tables: dict[torch.device, Tensor] = {}  # ᾱ with a leading 1 for t = -1, once per device

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ at integer timesteps ``t`` (``-1`` -> 1), as float64."""
        t = torch.as_tensor(t)
        table = self._tables.get(t.device)
        if table is None:
            ones = torch.ones(1, dtype=torch.float64, device="cpu")
            table = self._tables[t.device] = torch.cat([ones, self.alphas_cumprod]).to(t.device)
        return table[t.long() + 1]

    def coefficients(self, t: Tensor, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a = self.alpha_bar(t)
        return a.sqrt(), (1 - a).sqrt()

    def initial_scale(self, t: int, like: Tensor) -> float:
        # diffusers' Euler starts at noise * sigma_max in σ-space: noise * sqrt(1 - ᾱ) in variance-preserving space
        return float((1 - self.alpha_bar(torch.tensor(t))).sqrt())

    def scheduler(self, prediction: str = "epsilon") -> Any:
        """diffusers' ``DDPMScheduler`` of this schedule (a trained model's training schedule)."""
        from diffusers import DDPMScheduler

        c = self.config
        return DDPMScheduler(num_train_timesteps=c.num_train_timesteps, beta_start=c.beta_start, beta_end=c.beta_end,
                             beta_schedule=c.beta_schedule, prediction_type=prediction)

    def check_prediction(self, prediction: str) -> None:
        if prediction == "flow":
            raise ValueError("prediction 'flow' needs a flow_match noise schedule; this one is discrete")


@dataclass(kw_only=True, frozen=True)
class FlowMatchConfig:
    """Rectified flow with a shifted time grid, as diffusers' ``FlowMatchEulerDiscreteScheduler`` (SD3, Flux)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    """σ = shift·u / (1 + (shift - 1)·u) for the unshifted u = (t + 1) / T (SD3: 3.0)."""
    use_dynamic_shifting: bool = False
    """Flux: the shift depends on the image's token count: exp(μ), μ linear from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len."""
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    patch_size: int = 2
    """Latent pixels per image token along a side (both SD3 and Flux: 2), for the token count."""


@NOISE_SCHEDULES.register("flow_match")
class FlowMatchSchedule(Schedule):
    """``x_t = (1 - σ) x0 + σ ε`` with σ on the shifted grid (``a = 1 - σ``, ``s = σ``); the network is given
    ``σ·T``, as diffusers' flow pipelines give it. Pure noise at the first trailing timestep (σ = 1)."""

    Config = FlowMatchConfig

    def __init__(self, config: FlowMatchConfig | None = None) -> None:
        self.config = config or FlowMatchConfig()
        self.T = self.config.num_train_timesteps

    def shift(self, like: Tensor | None) -> float:
        """The shift: static, or for Flux's dynamic shifting from ``like``'s token count."""
        c = self.config
        if not c.use_dynamic_shifting:
            return c.shift
        if like is None:
            raise ValueError("a dynamically shifted schedule needs the latents' size")
        h, w = like.shape[-2:]
        seq = (h // c.patch_size) * (w // c.patch_size)
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return math.exp(seq * m + c.base_shift - m * c.base_image_seq_len)

    def sigma(self, t: Tensor, like: Tensor | None = None) -> Tensor:
        """σ at integer timesteps ``t`` (``-1`` -> 0), as float64."""
        u = (torch.as_tensor(t).double() + 1) / self.T
        k = self.shift(like)
        return k * u / (1 + (k - 1) * u)

    def coefficients(self, t: Tensor, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        sigma = self.sigma(t, like)
        return 1 - sigma, sigma

    def model_time(self, t: Tensor, like: Tensor) -> Tensor:
        return (self.sigma(torch.as_tensor(t, device=like.device), like) * self.T).float()

    def initial_scale(self, t: int, like: Tensor) -> float:
        return 1.0  # flow pipelines start from the noise itself

    def scheduler(self) -> Any:
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` of this schedule; sampled with ``sigmas =
        linspace(1, 1/n, n)`` (and, with dynamic shifting, the image's ``mu``) it takes our trailing steps."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        c = self.config
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=c.num_train_timesteps, shift=c.shift, use_dynamic_shifting=c.use_dynamic_shifting,
            base_shift=c.base_shift, max_shift=c.max_shift, base_image_seq_len=c.base_image_seq_len,
            max_image_seq_len=c.max_image_seq_len,
        )

    def check_prediction(self, prediction: str) -> None:
        if prediction == "v_prediction":
            raise ValueError("prediction 'v_prediction' needs a discrete schedule; flow_match networks predict 'flow'")


def trailing_sigmas(n: int, T: int = 1000) -> list[float]:
    """The unshifted sigmas ``(t + 1) / T`` of our ``n`` trailing timesteps: what a flow pipeline is given as
    ``sigmas=`` to take exactly our steps (``linspace(1, 1/n, n)`` when ``n`` divides ``T``)."""
    ts = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)).long()
    return [float(t) / T for t in ts]


def snr_matched_timesteps(
    timesteps: list[int], reference: Schedule, target: Schedule, like: Tensor | None = None
) -> list[int]:
    """For each of ``reference``'s ``timesteps``, the timestep of ``target`` with the nearest log signal-to-noise
    ratio ``log(a² / s²)``: the same noise level on another schedule (e.g. SDXL's re-noise levels, chosen for its
    scaled-linear betas, on a linear-beta or a flow schedule; ``like``: latents, for a resolution-dependent one)."""
    grid = target.log_snr(torch.arange(target.T), like)
    wanted = reference.log_snr(torch.tensor(timesteps), like)
    return [int((grid - w).abs().argmin()) for w in wanted]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    v = torch.as_tensor(v, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def schedule_from_pretrained(pretrained: str, subfolder: str = "scheduler") -> tuple[Schedule, Prediction] | None:
    """The noise schedule and prediction type of a pipeline's scheduler config (local folder or hub id), if it
    has one: ``FlowMatch*`` schedulers give a flow schedule (prediction ``flow``), the others discrete betas."""
    from diffusers import DDPMScheduler

    from lightning_distill.errors import UserError

    from pathlib import Path

    from lightning_distill.models.architectures import known_config

    known = known_config(pretrained, subfolder)
    try:
        if known is not None and not (Path(pretrained).expanduser() / subfolder).is_dir():
            c = known
        else:
            c = DDPMScheduler.load_config(pretrained, subfolder=subfolder)
    except (OSError, ValueError):
        return None
    where = f"{pretrained}/{subfolder}/scheduler_config.json"
    if str(c.get("_class_name", "")).startswith("FlowMatch"):
        if c.get("invert_sigmas") or c.get("shift_terminal") or c.get("use_karras_sigmas") or c.get("use_beta_sigmas") \
                or c.get("use_exponential_sigmas") or c.get("time_shift_type", "exponential") != "exponential":
            raise UserError(f"{where}: only plain shifted flow-matching sigmas are supported (no invert_sigmas, "
                            "shift_terminal, karras/beta/exponential sigmas or linear time shift); set "
                            "method.teacher.noise_schedule explicitly")
        fields = {k: c[k] for k in ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                                    "base_image_seq_len", "max_image_seq_len") if c.get(k) is not None}
        return FlowMatchSchedule(FlowMatchConfig(**fields)), "flow"
    if c.get("rescale_betas_zero_snr") or c.get("trained_betas") is not None:
        raise UserError(f"{where}: rescale_betas_zero_snr and trained_betas are not supported; "
                        "set method.teacher.noise_schedule explicitly")
    config = NoiseScheduleConfig(
        num_train_timesteps=c.get("num_train_timesteps", 1000),
        beta_start=c.get("beta_start", 0.00085),
        beta_end=c.get("beta_end", 0.012),
        beta_schedule=c.get("beta_schedule", "scaled_linear"),
    )
    return NoiseSchedule(config), c.get("prediction_type", "epsilon")
