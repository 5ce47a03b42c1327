"""Pixels <-> latents."""

from __future__ import annotations

from torch import Tensor, nn

from ..registry import CODECS


@CODECS.register("identity")
class Identity(nn.Module):
    """Latents are the pixels (for pixel-space models and data that are already latents)."""

    def encode(self, pixels: Tensor) -> Tensor:
        return pixels

    def decode(self, latents: Tensor) -> Tensor:
        return latents
