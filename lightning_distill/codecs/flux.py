"""Flux's codec: the 16-channel VAE (with a shift) and the CLIP (pooled) and T5 (sequence) text encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_distill.codecs.vae import VAECodec, VAECodecConfig
from lightning_distill.codecs.sd3 import MAX_T5_TOKENS
from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError


@CODECS.register("flux")
class FluxCodec(VAECodec):
    """Flux's VAE (latents ``(z - shift_factor) * scaling_factor``, unpacked ``[B, 16, H/8, W/8]``: the network
    packs them into 2x2 patches) and its two text encoders.

    ``encode_text(captions)`` follows ``FluxPipeline.encode_prompt``: ``text`` is T5's last hidden states
    (``[B, max_sequence_length, 4096]`` for Flux) and ``pooled`` CLIP's pooled output, not projected
    (``[B, 768]``). The pipeline's ``text_ids`` (zeros) are left to the network. Flux is guidance-distilled and
    uses no classifier-free guidance, so ``zero_null`` is never used.
    """

    zero_null = True  # never read: Flux samples without classifier-free guidance

    @dataclass(kw_only=True)
    class Config(VAECodecConfig):
        max_sequence_length: int = 512
        """T5 tokens per caption (padded or truncated), end token included."""

    def __init__(self, config: Config) -> None:
        if not 1 <= config.max_sequence_length <= MAX_T5_TOKENS:
            raise UserError(f"codec flux: max_sequence_length must be 1 to {MAX_T5_TOKENS}, not {config.max_sequence_length}")
        super().__init__(config)
        self.text_encoder = self.text_encoder_2 = None
        if config.text_encoders:
            from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

            self.tokenizer = self.text_model(CLIPTokenizer, "tokenizer")
            self.tokenizer_2 = self.text_model(T5TokenizerFast, "tokenizer_2")
            self.text_encoder = self.text_model(CLIPTextModel, "text_encoder")
            self.text_encoder_2 = self.text_model(T5EncoderModel, "text_encoder_2")
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode_text(self, captions: list[str], time_ids: Tensor | None = None) -> dict[str, Tensor]:
        """``{"text": [B, max_sequence_length, t5 width], "pooled": [B, clip width]}`` (``time_ids``: unused)."""
        if self.text_encoder is None:
            raise UserError("codec flux: captions need the text encoders; set codec.text_encoders: true")
        captions = list(captions)
        clip_device = next(self.text_encoder.parameters()).device
        ids = self.tokenizer(
            captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(clip_device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.float()
        t5_device = next(self.text_encoder_2.parameters()).device
        ids = self.tokenizer_2(
            captions, padding="max_length", max_length=self.config.max_sequence_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(t5_device)
        text = self.text_encoder_2(ids, output_hidden_states=False)[0].float()
        return {"text": text.to(clip_device), "pooled": pooled}
