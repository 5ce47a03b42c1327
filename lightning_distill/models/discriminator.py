"""Discriminators: a backbone (features of a latent at a timestep, text-conditioned) and a head (logits)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_distill.config.fields import PositiveInt, Spec, component
from lightning_distill.config.registry import DISCRIMINATORS, HEADS
from lightning_distill.models.teacher import SamplerTeacher


@HEADS.register("conv")
class ConvHead(nn.Module):
    """{4×4 stride-2 conv, GroupNorm, SiLU} blocks, then a 1×1 projection to one logit per position, averaged."""

    @dataclass(kw_only=True)
    class Config:
        channels: PositiveInt = 64
        blocks: PositiveInt = 1
        groups: PositiveInt = 32

    def __init__(self, config: Config, *, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(config.blocks):
            layers += [
                nn.Conv2d(c, config.channels, 4, stride=2, padding=1),
                nn.GroupNorm(min(config.groups, config.channels), config.channels),
                nn.SiLU(),
            ]
            c = config.channels
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).flatten(1).mean(1)


@DISCRIMINATORS.register("backbone_head")
class BackboneHead(nn.Module):
    """``D(x_{t-ns}, t-ns, c)`` or, conditional, ``D(x_t, x_{t-ns}, t, t-ns, c)``: both latents through the
    shared backbone (each at its own timestep), features concatenated on channels before the head."""

    @dataclass(kw_only=True)
    class Config:
        backbone: component("backbone")  # type: ignore[valid-type]
        """toy for toy teachers, unet_encoder for diffusers UNets."""
        head: component("head") = field(default_factory=lambda: {"name": "conv"})  # type: ignore[valid-type]

    def __init__(self, config: Config, *, teacher: SamplerTeacher, conditional: bool) -> None:
        super().__init__()
        backbone: Spec = config.backbone
        head: Spec = config.head
        self.conditional = conditional
        self.backbone = backbone.build(teacher=teacher)
        channels = self.backbone.out_channels * (2 if conditional else 1)
        self.head = head.build(in_channels=channels)

    def forward(
        self, x_prev: Tensor, t_prev: Tensor, cond: dict[str, Tensor], x_t: Tensor | None = None, t: Tensor | None = None
    ) -> Tensor:
        if not self.conditional:
            return self.head(self.backbone(x_prev, t_prev.clamp(min=0), cond))
        assert x_t is not None and t is not None, "a conditional discriminator needs x_t and t"
        n = x_prev.shape[0]
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        feats = self.backbone(torch.cat([x_t, x_prev]), torch.cat([t, t_prev.clamp(min=0)]), both)
        return self.head(torch.cat([feats[:n], feats[n:]], dim=1))

    def fsdp_units(self) -> list[nn.Module]:
        return [self.backbone, self.head]
