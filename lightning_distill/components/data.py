"""Data sources: map-style datasets of dicts of tensors, batched by the loop's StatefulDataLoader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..registry import DATA


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@DATA.register("image_folder")
class ImageFolder(Dataset):
    """Images with captions in a ``.txt`` beside each (``cat.png`` + ``cat.txt``), searched recursively.

    Items: ``pixels`` in ``[-1, 1]`` (shorter side resized to ``resolution``, then center-cropped square), the
    ``caption``, and SDXL's micro-conditioning ``time_ids`` (original size, crop top-left, target size).
    """

    @dataclass(kw_only=True)
    class Config:
        root: str
        resolution: int = 1024
        caption_suffix: str = ".txt"

    def __init__(self, config: Config, *, seed: int = 0) -> None:
        from pathlib import Path

        from ..errors import UserError

        self.config = config
        root = Path(config.root).expanduser()
        if not root.is_dir():
            raise UserError(f"data.root: no folder {root}")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        import numpy as np
        from PIL import Image

        path = self.files[i]
        caption_file = path.with_suffix(self.config.caption_suffix)
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            r = self.config.resolution
            scale = r / min(w, h)
            nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
            top, left = (nh - r) // 2, (nw - r) // 2
            im = im.crop((left, top, left + r, top + r))
            pixels = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
        time_ids = torch.tensor([h, w, top, left, r, r], dtype=torch.float32)
        return {"pixels": pixels, "caption": caption, "time_ids": time_ids}
