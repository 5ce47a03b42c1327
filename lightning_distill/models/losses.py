"""Objectives: regression (``loss(pred, target)``) and adversarial (discriminator and generator losses).

Adversarial losses take the discriminator's logits on real samples (the teacher's ``x_{t-ns}``) and on fakes (the
student's), paired per sample: ``real[i]`` and ``fake[i]`` come from the same ``x_t``, text and re-noising noise.
``generator_loss(fake, real)`` receives the real logits too; only relativistic losses (``relativistic = True``)
use them, and the method computes them only for those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.config.registry import LOSSES


@LOSSES.register("mse")
class MSE:
    """Mean squared error between the student's and the teacher's ``x_{t-ns}`` (the paper's first stage)."""

    adversarial = False

    @dataclass(kw_only=True)
    class Config:
        reduction: Literal["mean", "sum"] = "mean"

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred.float(), target.float(), reduction=self.config.reduction)


class AdversarialLoss:
    """Base of the adversarial losses (the contract in ``LOSSES``' docstring)."""

    adversarial = True
    relativistic = False
    """The generator's loss needs the real logits (paired per sample)."""

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        raise NotImplementedError

    def generator_loss(self, fake: Tensor, real: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def chance(self) -> float:
        """The discriminator's loss at chance: the least a discriminator that gives every sample the same logit can
        reach. A discriminator whose loss stays there has learnt nothing, whatever its accuracy says. Found here
        on a grid of constant logits; the losses below give it exactly."""
        return constant_logit_minimum(self)


def constant_logit_minimum(loss: object, *, span: float = 20.0, points: int = 4001) -> float:
    """The least of ``loss.discriminator_loss`` over constant logits in ``[-span, span]``."""
    with torch.no_grad():
        return min(float(loss.discriminator_loss(torch.full((1,), c), torch.full((1,), c)))  # type: ignore[attr-defined]
                   for c in torch.linspace(-span, span, points).tolist())


def chance_loss(loss: object) -> float:
    """``loss.chance()`` where the loss has it, else :func:`constant_logit_minimum` (a plugin's loss need only
    keep the registry's contract, not derive from :class:`AdversarialLoss`)."""
    chance = getattr(loss, "chance", None)
    return float(chance()) if callable(chance) else constant_logit_minimum(loss)


@LOSSES.register("ns_gan")
class NonSaturatingGAN(AdversarialLoss):
    """Non-saturating GAN (the paper's): ``L_D = -log p - log(1 - p̂)``, ``L_G = -log p̂`` with ``p = sigmoid(logit)``.

    Patch logits ``[B, ...]`` are averaged. ``softplus(-x) = -log sigmoid(x)`` keeps it finite.
    """

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        return F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()

    def chance(self) -> float:
        return 2 * math.log(2)  # logit 0

    def generator_loss(self, fake: Tensor, real: Tensor | None = None) -> Tensor:
        return F.softplus(-fake.float()).mean()


@LOSSES.register("hinge")
class Hinge(AdversarialLoss):
    """Hinge GAN (LADD's): ``L_D = mean(relu(m - real)) + mean(relu(m + fake))``, ``L_G = -mean(fake)``."""

    @dataclass(kw_only=True)
    class Config:
        margin: float = 1.0

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        m = self.config.margin
        return F.relu(m - real.float()).mean() + F.relu(m + fake.float()).mean()

    def chance(self) -> float:
        return 2 * self.config.margin  # any logit in [-m, m]

    def generator_loss(self, fake: Tensor, real: Tensor | None = None) -> Tensor:
        return -fake.float().mean()


@LOSSES.register("lsgan")
class LeastSquares(AdversarialLoss):
    """Least-squares GAN (Mao et al. 2017): ``L_D = mean((real - a)²) + mean(fake²)``, ``L_G = mean((fake - a)²)``
    with ``a`` the real label."""

    @dataclass(kw_only=True)
    class Config:
        target: float = 1.0
        """The label of real samples (fake ones are 0)."""

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        return (real.float() - self.config.target).square().mean() + fake.float().square().mean()

    def chance(self) -> float:
        return self.config.target ** 2 / 2  # logit a / 2

    def generator_loss(self, fake: Tensor, real: Tensor | None = None) -> Tensor:
        return (fake.float() - self.config.target).square().mean()


@LOSSES.register("rpgan")
class RelativisticPairing(AdversarialLoss):
    """Relativistic pairing GAN (RpGAN; R3GAN, Huang et al. 2024): each real sample is judged against the fake made
    from the same ``x_t``, ``L_D = mean(softplus(-(real - fake)))``, ``L_G = mean(softplus(-(fake - real)))``.

    The discriminator learns a margin between the pair rather than an absolute label, so it cannot saturate on
    one side; with R1 and R2 it converges locally where the non-saturating loss oscillates. The real logits in the
    generator's loss carry no gradient to the student (the teacher's sample does not depend on it).
    """

    relativistic = True

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        return F.softplus(-(real.float() - fake.float())).mean()

    def chance(self) -> float:
        return math.log(2)  # equal logits within each pair

    def generator_loss(self, fake: Tensor, real: Tensor | None = None) -> Tensor:
        if real is None:
            raise ValueError("rpgan's generator loss pairs each fake with its real sample's logit: pass real")
        return F.softplus(-(fake.float() - real.float().detach())).mean()
