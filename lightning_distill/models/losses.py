"""Objectives: regression (``loss(pred, target)``) and adversarial (discriminator and generator losses)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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


@LOSSES.register("ns_gan")
class NonSaturatingGAN:
    """Non-saturating GAN: ``L_D = -log p - log(1 - p̂)``, ``L_G = -log p̂`` with ``p = sigmoid(logit)``.

    Patch logits ``[B, ...]`` are averaged. ``softplus(-x) = -log sigmoid(x)`` keeps it finite.
    """

    adversarial = True

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Config) -> None:
        self.config = config

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        return F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean()

    def generator_loss(self, fake: Tensor) -> Tensor:
        return F.softplus(-fake.float()).mean()


@LOSSES.register("hinge")
class Hinge:
    """Hinge GAN: ``L_D = mean(relu(m - real)) + mean(relu(m + fake))``, ``L_G = -mean(fake)``."""

    adversarial = True

    @dataclass(kw_only=True)
    class Config:
        margin: float = 1.0

    def __init__(self, config: Config) -> None:
        self.config = config

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        m = self.config.margin
        return F.relu(m - real.float()).mean() + F.relu(m + fake.float()).mean()

    def generator_loss(self, fake: Tensor) -> Tensor:
        return -fake.float().mean()
