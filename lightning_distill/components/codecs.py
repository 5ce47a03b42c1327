"""Pixels <-> latents, and what a codec's text encoders make of a batch's captions."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..errors import UserError
from ..registry import CODECS

NOT_CONDITIONING = ("caption", "pixels", "latents", "attributes", "mentioned")
"""Batch entries that are not passed to the network as conditioning (other entries, e.g. ``text``, are)."""


def batch_latents(batch: dict[str, Any], codec: nn.Module) -> Tensor:
    """The batch's latents, encoding its pixels when it has no latents."""
    return batch["latents"] if "latents" in batch else codec.encode(batch["pixels"])


def prompt_conditioning(codec: nn.Module, prompts: list[str], height: int, width: int, device: Any) -> dict[str, Tensor]:
    """The codec's text conditioning for ``prompts`` at an image size in pixels: codecs that take SDXL's
    micro-conditioning (``uses_time_ids``, the default) get uncropped square ``time_ids``."""
    if not getattr(codec, "uses_time_ids", True):
        return codec.encode_text(list(prompts))
    from .sdxl import default_time_ids

    return codec.encode_text(list(prompts), default_time_ids(height, width, len(prompts), device))


def batch_conditioning(batch: dict[str, Any], codec: nn.Module) -> dict[str, Tensor]:
    """The network's conditioning for a batch: its entries that are not images or captions, plus the encoded
    captions (with the batch's own ``time_ids`` when it has them)."""
    cond = {k: v for k, v in batch.items() if k not in NOT_CONDITIONING}
    if "caption" not in batch:
        return cond
    if getattr(codec, "encode_text", None) is None:
        raise UserError("the data has captions but the codec has no text encoders; use codec sdxl")
    captions = list(batch["caption"])
    if getattr(codec, "uses_time_ids", True) and "time_ids" in cond:
        return {**cond, **codec.encode_text(captions, cond["time_ids"])}
    images = batch.get("pixels", batch.get("latents"))
    f = 1 if "pixels" in batch else getattr(codec, "scale_factor", 8)
    h, w = (f * s for s in images.shape[-2:])
    return {**cond, **prompt_conditioning(codec, captions, h, w, images.device)}


@CODECS.register("identity")
class Identity(nn.Module):
    """Latents are the pixels (for pixel-space models and data that are already latents)."""

    def encode(self, pixels: Tensor) -> Tensor:
        return pixels

    def decode(self, latents: Tensor) -> Tensor:
        return latents
