"""The one sampler: Euler/DDIM on trailing timesteps, as diffusers' ``EulerDiscreteScheduler`` samples a discrete
schedule and ``FlowMatchEulerDiscreteScheduler`` (with ``sigmas = linspace(1, 1/n, n)``) a flow schedule.

Our sampler follows diffusers exactly, starting point included: diffusers' Euler starts at ``noise * sigma_max``
in σ-space, which is ``noise * sqrt(1 - ᾱ_T)`` in variance-preserving space; flow pipelines start at the noise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_distill.models.noise import Schedule


@torch.no_grad()
def sample_latents(
    denoiser: Any, schedule: Schedule, prediction: str, noise: Tensor, cond: dict[str, Tensor], steps: int
) -> Tensor:
    """``steps`` Euler/DDIM steps on trailing timesteps from ``noise`` (as diffusers draws it) to clean latents."""
    ts = [*schedule.timesteps(steps, "trailing"), -1]
    x = noise * schedule.initial_scale(ts[0], noise)
    for t, t_prev in zip(ts[:-1], ts[1:]):
        tt = torch.full((x.shape[0],), t, device=x.device)
        x0, eps = schedule.split(denoiser(x, tt, cond).to(x.dtype), x, tt, prediction)  # type: ignore[arg-type]
        x = schedule.step(x0, eps, torch.full((x.shape[0],), t_prev, device=x.device))
    return x
