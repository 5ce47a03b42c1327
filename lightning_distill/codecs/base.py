"""The codec contract (pixels <-> latents, captions -> conditioning), the identity codec, and what a codec makes of
a batch."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError

NOT_CONDITIONING = ("caption", "pixels", "latents", "attributes", "mentioned")
"""Batch entries that are not passed to the network as conditioning (other entries, e.g. ``text``, are)."""


class Codec(nn.Module):
    """Base class of codecs: it declares what a codec can do, so that nothing has to guess.

    Subclasses implement ``encode``/``decode`` and, when they have text encoders (``has_text = True``),
    ``encode_text``; a codec whose network takes more than the text (SDXL's ``time_ids``) overrides
    :meth:`caption_conditioning`.
    """

    scale_factor: int = 1
    """Pixels per latent along a side (1: pixel space)."""
    has_text: bool = False
    """Whether the codec turns captions into conditioning (``encode_text``)."""
    zero_null: bool = True
    """Whether classifier-free guidance's unconditional input is zero text embeddings (SDXL's
    ``force_zeros_for_empty_prompt``) or, when False, the encoding of the empty caption (SD1.5, SD3): then
    ``encode_text([""])`` gives it, as the family's pipeline computes its negative prompt."""
    cached_null: dict[str, Tensor] | None = None
    """The empty caption's conditioning a cache of this codec holds (set by the cached data when the recipe turns
    the text encoders off): guidance's unconditional input then comes from it."""
    null_keeps: tuple[str, ...] = ("time_ids",)
    """Conditioning entries that guidance's unconditional input keeps as they are (not text: SDXL's ``time_ids``;
    a plugin's attention masks or size inputs); every other entry is nulled as ``zero_null`` says."""

    def encode(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def encode_text(self, captions: list[str], time_ids: Tensor | None = None) -> dict[str, Tensor]:
        raise UserError(f"codec {type(self).__name__} has no text encoders; use a codec such as sdxl or minilm")

    def caption_conditioning(
        self, captions: list[str], height: int, width: int, device: Any, time_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The network's text conditioning for ``captions`` of images ``height`` x ``width`` pixels (``time_ids``:
        the batch's own micro-conditioning, where it has some)."""
        return self.encode_text(list(captions))


def batch_latents(batch: dict[str, Any], codec: nn.Module) -> Tensor:
    """The batch's latents, encoding its pixels when it has no latents."""
    return batch["latents"] if "latents" in batch else codec.encode(batch["pixels"])


def prompt_conditioning(codec: Codec, prompts: list[str], height: int, width: int, device: Any) -> dict[str, Tensor]:
    """The codec's text conditioning for ``prompts`` at an image size in pixels."""
    return codec.caption_conditioning(list(prompts), height, width, device)


def null_conditioning(codec: Codec, height: int, width: int, device: Any) -> dict[str, Tensor] | None:
    """Classifier-free guidance's unconditional input, one row: the empty caption's encoding for codecs whose
    pipeline encodes it (``zero_null = False``), without the entries the codec keeps (``null_keeps``); else None
    (zeros, made from the batch: no text encoder needed, as with cached embeddings)."""
    if codec.zero_null or not codec.has_text:
        return None
    keeps = set(codec.null_keeps)
    cached = getattr(codec, "cached_null", None)  # a cache's, handed over when the text encoders are off
    null = {k: v.to(device) for k, v in cached.items()} if cached is not None else codec.caption_conditioning([""], height, width, device)
    return {k: v for k, v in null.items() if k not in keeps}


def batch_conditioning(batch: dict[str, Any], codec: Codec) -> dict[str, Tensor]:
    """The network's conditioning for a batch: its entries that are not images or captions, plus the encoded
    captions (with the batch's own ``time_ids`` when it has them)."""
    cond = {k: v for k, v in batch.items() if k not in NOT_CONDITIONING}
    if "caption" not in batch:
        return cond
    if not codec.has_text:
        raise UserError("the data has captions but the codec has no text encoders: choose a codec with "
                            "has_text = True (one that implements caption_conditioning, e.g. minilm, sdxl, sd15, sd3, "
                            "flux), or data with cached embeddings")
    images = batch.get("pixels", batch.get("latents"))
    f = 1 if "pixels" in batch else codec.scale_factor
    h, w = (f * s for s in images.shape[-2:])
    return {**cond, **codec.caption_conditioning(list(batch["caption"]), h, w, images.device, cond.get("time_ids"))}


@CODECS.register("identity")
class Identity(Codec):
    """Latents are the pixels (for pixel-space models and data that are already latents)."""

    def encode(self, pixels: Tensor) -> Tensor:
        return pixels

    def decode(self, latents: Tensor) -> Tensor:
        return latents
