"""Example plugin: a hinge GAN loss and a patch discriminator head, registered on import."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill import HEADS, LOSSES


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
