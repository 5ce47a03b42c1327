"""Stable Diffusion 1.5's codec: the VAE (pixels <-> latents) and its one CLIP text encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_distill.codecs.vae import VAECodec, VAECodecConfig
from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError


@CODECS.register("sd15")
class SD15Codec(VAECodec):
    """SD1.5's VAE (pixels <-> latents, scaled by ``scaling_factor``) and its CLIP text encoder.

    ``encode_text(captions)`` gives ``text``: the CLIP encoder's last hidden state (after its final layer norm),
    ``[B, 77, 768]`` for SD1.5, as ``StableDiffusionPipeline.encode_prompt`` computes ``prompt_embeds`` without
    ``clip_skip``. An empty caption is encoded like any other: that is the pipeline's negative prompt.
    """

    zero_null = False

    @dataclass(kw_only=True)
    class Config(VAECodecConfig):
        pass

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.text_encoder = None
        if config.text_encoders:
            from transformers import CLIPTextModel, CLIPTokenizer

            self.tokenizer = self.text_model(CLIPTokenizer, "tokenizer")
            self.text_encoder = self.text_model(CLIPTextModel, "text_encoder")
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode_text(self, captions: list[str], time_ids: Tensor | None = None) -> dict[str, Tensor]:
        """``{"text": [B, tokens, hidden]}`` for ``captions`` (``time_ids``: unused, SD1.5 has no
        micro-conditioning)."""
        if self.text_encoder is None:
            raise UserError("codec sd15: captions need the text encoder; set codec.text_encoders: true")
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(
            list(captions), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )
        # the pipeline passes the attention mask only to encoders whose config asks for it (not SD1.5's CLIP)
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        return {"text": self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()}
