"""SDXL's codec: the VAE (pixels <-> latents) and the two CLIP text encoders with SDXL's micro-conditioning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_distill.codecs.vae import VAECodec, VAECodecConfig
from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError


@CODECS.register("sdxl")
class SDXLCodec(VAECodec):
    """SDXL's VAE (pixels <-> latents, scaled by ``scaling_factor``) and its two CLIP text encoders.

    ``encode_text(captions, time_ids)`` follows SDXL: the penultimate hidden states of both encoders
    concatenated on channels (``text``), the second encoder's projected pooled output (``pooled``), and the
    micro-conditioning ``time_ids``. Empty captions give zero embeddings (``force_zeros_for_empty_prompt``).
    """

    @dataclass(kw_only=True)
    class Config(VAECodecConfig):
        pass

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.text_encoder = self.text_encoder_2 = None
        if config.text_encoders:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

            self.tokenizer = self.text_model(CLIPTokenizer, "tokenizer")
            self.tokenizer_2 = self.text_model(CLIPTokenizer, "tokenizer_2")
            self.text_encoder = self.text_model(CLIPTextModel, "text_encoder")
            self.text_encoder_2 = self.text_model(CLIPTextModelWithProjection, "text_encoder_2")
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode_text(self, captions: list[str], time_ids: Tensor) -> dict[str, Tensor]:
        if self.text_encoder is None:
            raise UserError("codec sdxl: captions need the text encoders; set codec.text_encoders: true")
        device = next(self.text_encoder.parameters()).device
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the projected pooled output of the second encoder (text_embeds)
        text = torch.cat(states, dim=-1).float()
        pooled_t = pooled.float()  # type: ignore[union-attr]
        empty = torch.tensor([not c for c in captions], device=device)
        text = torch.where(empty[:, None, None], torch.zeros_like(text), text)
        pooled_t = torch.where(empty[:, None], torch.zeros_like(pooled_t), pooled_t)
        return {"text": text, "pooled": pooled_t, "time_ids": time_ids.to(device).float()}

    def caption_conditioning(
        self, captions: list[str], height: int, width: int, device: Any, time_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        """SDXL's micro-conditioning: the batch's ``time_ids``, else uncropped square ones at the image size."""
        if time_ids is None:
            time_ids = default_time_ids(height, width, len(captions), device)
        return self.encode_text(list(captions), time_ids)


def default_time_ids(height: int, width: int, batch: int, device: Any = None) -> Tensor:
    """SDXL micro-conditioning for uncropped square training: original = target = image size, crop (0, 0)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device).repeat(batch, 1)
