"""Example plugin: a label-smoothed non-saturating GAN loss and a patch discriminator head, registered on import."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill import HEADS, LOSSES


@LOSSES.register("ns_gan_smooth")
class SmoothedNonSaturating:
    """Non-saturating GAN with one-sided label smoothing (Salimans et al. 2016): real samples are labelled
    ``real_label`` instead of 1, ``L_D = -a log p - (1 - a) log(1 - p) - log(1 - p̂)``, ``L_G = -log p̂``."""

    adversarial = True
    relativistic = False  # the generator's loss does not need the real logits

    @dataclass(kw_only=True)
    class Config:
        real_label: float = 0.9
        """The label of real samples (fake ones are 0)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        a, real = self.config.real_label, real.float()
        return (a * F.softplus(-real) + (1 - a) * F.softplus(real)).mean() + F.softplus(fake.float()).mean()

    def generator_loss(self, fake: Tensor, real: Tensor | None = None) -> Tensor:
        return F.softplus(-fake.float()).mean()


@HEADS.register("patch")
class PatchHead(nn.Module):
    """3×3 conv, GroupNorm, SiLU, then a 1×1 conv to one logit per position: ``[B, H, W]`` patch logits."""

    @dataclass(kw_only=True)
    class Config:
        channels: int = 32
        groups: int = 8

    def __init__(self, config: Config, *, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, config.channels, 3, padding=1),
            nn.GroupNorm(config.groups, config.channels),
            nn.SiLU(),
            nn.Conv2d(config.channels, 1, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)[:, 0]
