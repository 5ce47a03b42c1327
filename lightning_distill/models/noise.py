"""Noise schedule, parameterisations and the DDIM/Euler solver step, as pure tensor functions.

Timesteps are integers in ``[0, T)``; ``t_prev = -1`` means the clean end of the trajectory (ᾱ = 1, σ = 0).
DDIM (η = 0) in variance-preserving space and Euler in σ-space (``x / sqrt(ᾱ)``) are the same step, so one
solver serves both samplers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Prediction = Literal["epsilon", "sample", "v_prediction"]


@dataclass(kw_only=True, frozen=True)
class NoiseScheduleConfig:
    """The discrete diffusion schedule (SDXL's by default)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"


class NoiseSchedule:
    """ᾱ_t of a discrete schedule, with conversions between parameterisations."""

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
        """``x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε``. With ``pure_noise_at_T``, ``x_{T-1} = ε``: SDXL's schedule never
        reaches pure noise, while sampling starts from it, so training swaps it in at the last timestep."""
        sa, s1a = self._coefs(t, x0)
        x_t = sa * x0 + s1a * noise
        if pure_noise_at_T:
            last = _bcast(torch.as_tensor(t, device=x0.device) == self.T - 1, x0)
            x_t = torch.where(last, noise, x_t)
        return x_t

    def split(self, pred: Tensor, x_t: Tensor, t: Tensor, prediction: Prediction) -> tuple[Tensor, Tensor]:
        """``(x0, ε)`` implied by a network output under the given parameterisation."""
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
        else:
            raise ValueError(f"unknown prediction type {prediction!r}")
        return x0, eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction: Prediction) -> Tensor:
        """The network output that would imply ``(x0, ε)`` at ``t``."""
        if prediction == "epsilon":
            return eps
        if prediction == "sample":
            return x0
        sa, s1a = self._coefs(t, x0)
        return sa * eps - s1a * x0

    def step(self, x0: Tensor, eps: Tensor, t_prev: Tensor) -> Tensor:
        """DDIM (η = 0) to ``t_prev``: ``sqrt(ᾱ') x0 + sqrt(1-ᾱ') ε`` — equal to an Euler step in σ-space."""
        sa, s1a = self._coefs(t_prev, x0)
        return sa * x0 + s1a * eps

    def _coefs(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(sqrt(ᾱ), sqrt(1-ᾱ))`` computed in float64, broadcast to ``like`` and cast to its dtype."""
        a = _bcast(self.alpha_bar(t), like)
        return a.sqrt().to(like.dtype), (1 - a).sqrt().to(like.dtype)


def snr_matched_timesteps(timesteps: list[int], reference: NoiseSchedule, target: NoiseSchedule) -> list[int]:
    """For each of ``reference``'s ``timesteps``, the timestep of ``target`` with the nearest log signal-to-noise
    ratio ``log(ᾱ / (1 - ᾱ))``: the same noise level on another schedule (e.g. SDXL's re-noise levels, chosen for
    its scaled-linear betas, on a linear-beta schedule)."""

    def log_snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
        a = schedule.alpha_bar(t)
        return (a / (1 - a)).log()

    grid = log_snr(target, torch.arange(target.T))
    wanted = log_snr(reference, torch.tensor(timesteps))
    return [int((grid - w).abs().argmin()) for w in wanted]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    v = torch.as_tensor(v, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))
