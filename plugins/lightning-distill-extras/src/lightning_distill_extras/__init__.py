"""Example plugin: a least-squares GAN loss and a patch discriminator head, registered on import."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_distill import HEADS, LOSSES


@LOSSES.register("lsgan")
class LeastSquares:
    """Least-squares GAN (Mao et al. 2017): ``L_D = mean((real - 1)^2) + mean(fake^2)``, ``L_G = mean((fake - 1)^2)``."""

    adversarial = True

    @dataclass(kw_only=True)
    class Config:
        target: float = 1.0
        """The label of real samples (fake ones are 0)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        return ((real.float() - self.config.target) ** 2).mean() + (fake.float() ** 2).mean()

    def generator_loss(self, fake: Tensor) -> Tensor:
        return ((fake.float() - self.config.target) ** 2).mean()


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
