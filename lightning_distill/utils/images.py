"""Image grids (no torchvision dependency)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def image_grid(images: Tensor, nrow: int | None = None, pad: int = 1) -> Tensor:
    """``[N, C, H, W]`` images in ``[0, 1]`` tiled into one ``[C, H', W']`` image, ``nrow`` per row."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=images.dtype)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, top : top + h, left : left + w] = img
    return grid


def to_unit(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` (decoded latents, data pixels) as float32 in ``[0, 1]`` on the CPU; the first three
    channels only (what a grid or a metric looks at)."""
    return ((images[:, :3].float().clamp(-1, 1) + 1) / 2).cpu()
