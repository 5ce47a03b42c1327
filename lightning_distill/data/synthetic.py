"""Data sources: map-style datasets of dicts of tensors, batched by the loop's StatefulDataLoader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_distill.config.registry import DATA


@DATA.register("synthetic")
class Synthetic(Dataset):
    """Random class-conditioned latents and text embeddings, deterministic from the seed (for debug runs).

    Item ``i`` belongs to class ``i % num_classes``: its latent is the class's smooth pattern plus a little
    noise, its text is the class's token embeddings. No file is read.
    """

    @dataclass(kw_only=True)
    class Config:
        size: int = 64
        num_classes: int = 4
        channels: int = 4
        resolution: int = 8
        tokens: int = 4
        text_dim: int = 16
        noise: float = 0.1

    def __init__(self, config: Config, *, seed: int = 0) -> None:
        self.config = c = config
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(c.num_classes, c.channels, 2, 2, generator=g)
        self.patterns = torch.nn.functional.interpolate(coarse, size=c.resolution, mode="bilinear", align_corners=False)
        self.text = torch.randn(c.num_classes, c.tokens, c.text_dim, generator=g)
        self.seed = seed

    def __len__(self) -> int:
        return self.config.size

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        c = self.config
        k = i % c.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        latents = self.patterns[k] + c.noise * torch.randn(self.patterns[k].shape, generator=g)
        return {"latents": latents, "text": self.text[k], "pooled": self.text[k].mean(0)}


