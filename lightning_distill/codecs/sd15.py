"""Stable Diffusion 1.5's codec: the VAE (pixels <-> latents) and its one CLIP text encoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_distill.codecs.base import Codec
from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError
from lightning_distill.utils.pretrained import load_pretrained
from lightning_distill.utils.tensors import DTYPES, Dtype


@CODECS.register("sd15")
class SD15Codec(Codec):
    """SD1.5's VAE (pixels <-> latents, scaled by ``scaling_factor``) and its CLIP text encoder.

    ``encode_text(captions)`` gives ``text``: the CLIP encoder's last hidden state (after its final layer norm),
    ``[B, 77, 768]`` for SD1.5, as ``StableDiffusionPipeline.encode_prompt`` computes ``prompt_embeds`` without
    ``clip_skip``. An empty caption is encoded like any other: that is the pipeline's negative prompt.
    """

    has_text = True  # encode_text says what to do when the recipe turned the encoder off
    zero_null = False

    @dataclass(kw_only=True)
    class Config:
        pretrained: str
        vae_subfolder: str = "vae"
        vae_dtype: Dtype = "float32"
        """SD1.5's VAE is safe in float32 (or bfloat16); float16 can overflow at high resolution."""
        text_dtype: Dtype = "float32"
        sample_latents: bool = False
        """Sample the VAE posterior instead of taking its mean."""
        text_encoders: bool = True
        """Load the text encoder (not needed when the data already holds embeddings)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        self.config = config
        self.vae = load_pretrained(AutoencoderKL, config.pretrained, config.vae_subfolder, torch_dtype=DTYPES[config.vae_dtype])
        self.scaling = float(self.vae.config.scaling_factor)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        """Pixels per latent (8 for SD1.5's VAE)."""
        self.text_encoder = None
        if config.text_encoders:
            from transformers import CLIPTextModel, CLIPTokenizer

            self.tokenizer = load_pretrained(CLIPTokenizer, config.pretrained, "tokenizer")
            self.text_encoder = load_pretrained(
                CLIPTextModel, config.pretrained, "text_encoder", torch_dtype=DTYPES[config.text_dtype]
            )
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample() if self.config.sample_latents else posterior.mean
        return (latents * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode((latents / self.scaling).to(self.vae.dtype)).sample.float()

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
