"""Discriminator regularisers: zero-centred gradient penalties on real (R1) and fake (R2) inputs, the
approximate R1 that needs no double backward, and a penalty on what a pair's logits share (pair centering).

Each is applied in the discriminator's step, lazily (every ``every``-th discriminator step, its weight multiplied
by ``every`` so that the average strength stays the same: StyleGAN2's lazy regularisation), and logs its value as
``reg/NAME``. "Real" is the teacher's ``x_{t-ns}``, "fake" the student's, each as the discriminator judged it
(re-noised to ``t*`` where the target is clean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_distill.config.fields import NonNegativeFloat, PositiveInt
from lightning_distill.config.registry import REGULARIZERS

Discriminate = Callable[[Tensor], Tensor]
"""``d(x) -> logits``: the discriminator on one batch's conditioning (timesteps, text, ``x_t``)."""


def discriminator_step_index(phase: Any, step: int) -> int:
    """How many steps the discriminator of ``phase`` took before global ``step`` (which it steps at)."""
    d = phase.optimizers["discriminator"]
    return (step - phase.start - d.after) // d.every


def regularizer_due(disc_step: int, every: int) -> bool:
    """Whether a lazy regulariser applies on the discriminator's ``disc_step``-th step of a phase (from 0)."""
    return disc_step % every == 0


def gradient_penalty(d: Discriminate, x: Tensor) -> Tensor:
    """``mean_i ‖∇_x Σ D(x)_i‖²``: the squared norm of D's gradient at each input, averaged over the batch. The graph
    is kept (``create_graph``) so that the penalty trains D (a double backward, through the math attention kernel:
    the fused ones have no second derivative)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = x.detach().requires_grad_(True)
    # fused attention kernels (flash, memory-efficient) have no second derivative: the math one has
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        logits = d(x)
        (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


class Regularizer:
    """Base of the regularisers: ``weight`` and ``every`` for all of them."""

    @dataclass(kw_only=True)
    class Config:
        weight: NonNegativeFloat = 1.0
        """Multiplies the penalty (R3GAN's γ/2 for R1 and R2)."""
        every: PositiveInt = 1
        """Apply on every this-many discriminator steps (lazy), with the weight multiplied by it."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self, d: Discriminate, real: Tensor, fake: Tensor, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        raise NotImplementedError


class GradientPenalty(Regularizer):
    """Zero-centred gradient penalty ``‖∇_x D(x)‖²`` on the inputs named by ``on``."""

    on = "real"

    def __call__(self, d: Discriminate, real: Tensor, fake: Tensor, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return gradient_penalty(d, real if self.on == "real" else fake)


@REGULARIZERS.register("r1")
class R1(GradientPenalty):
    """Zero-centred gradient penalty on real inputs (Mescheder et al. 2018): ``‖∇_x D(x_real)‖²``. Keeps D from
    growing steep around the teacher's samples. Needs a double backward (a trainable backbone, one device or DDP)."""

    on = "real"


@REGULARIZERS.register("r2")
class R2(GradientPenalty):
    """Zero-centred gradient penalty on fake inputs: ``‖∇_x D(x_fake)‖²`` (R3GAN pairs it with R1 and RpGAN)."""

    on = "fake"


@REGULARIZERS.register("approx_r1")
class ApproximateR1(Regularizer):
    """Approximate R1 (Seaweed-APT, 2025): ``mean ‖D(x) − D(x + σε)‖²`` on real inputs, a finite-difference stand-in
    for the gradient penalty. One more forward, no double backward: it works with frozen-feature backbones, under
    FSDP2 and with fused attention kernels that have no second derivative."""

    @dataclass(kw_only=True)
    class Config(Regularizer.Config):
        sigma: NonNegativeFloat = 0.01
        """Scale of the Gaussian perturbation, in the units of the discriminator's input."""

    def __call__(self, d: Discriminate, real: Tensor, fake: Tensor, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        x = real.detach()
        perturbed = d(x + self.config.sigma * torch.randn_like(x))
        return (real_logits.float() - perturbed.float()).square().mean()


@REGULARIZERS.register("pair_centering")
class PairCentering(Regularizer):
    """``mean_i ((D(real_i) + D(fake_i)) / 2)²``: a penalty on what a pair's logits share, which the loss leaves
    nearly free. ``real_i`` and ``fake_i`` come from the same ``x_t`` and re-noise, so that shared part is an offset
    per sample (its content), not evidence: against a student close to its teacher it grows as fast as the gap
    that ranks the pair (``d/shared_spread`` against ``d/margin``) and keeps the logits' signs at chance while the
    ranking is learnt. The non-saturating loss pulls it to 0 with a force of about ``s / 2`` per pair; this adds
    ``2 weight s``. Its gradient is the same on both logits of a pair, so it leaves their difference alone (ProGAN's
    drift penalty ``ε D(real)²`` centres the real logits alone, this the pair's mean). No backward through the
    inputs: any backbone, any strategy."""

    def __call__(self, d: Discriminate, real: Tensor, fake: Tensor, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        return ((real_logits.float() + fake_logits.float()) / 2).square().mean()
