"""Flux's codec: the 16-channel VAE (with a shift) and the CLIP (pooled) and T5 (sequence) text encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_distill.codecs.base import Codec
from lightning_distill.codecs.sd3 import MAX_T5_TOKENS
from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError
from lightning_distill.utils.pretrained import load_pretrained
from lightning_distill.utils.tensors import DTYPES, Dtype


@CODECS.register("flux")
class FluxCodec(Codec):
    """Flux's VAE (latents ``(z - shift_factor) * scaling_factor``, unpacked ``[B, 16, H/8, W/8]``: the network
    packs them into 2x2 patches) and its two text encoders.

    ``encode_text(captions)`` follows ``FluxPipeline.encode_prompt``: ``text`` is T5's last hidden states
    (``[B, max_sequence_length, 4096]`` for Flux) and ``pooled`` CLIP's pooled output, not projected
    (``[B, 768]``). The pipeline's ``text_ids`` (zeros) are left to the network. Flux is guidance-distilled and
    uses no classifier-free guidance, so ``zero_null`` is never used.
    """

    has_text = True  # encode_text says what to do when the recipe turned the encoders off
    zero_null = True  # never read: Flux samples without classifier-free guidance

    @dataclass(kw_only=True)
    class Config:
        pretrained: str
        vae_subfolder: str = "vae"
        vae_dtype: Dtype = "float32"
        text_dtype: Dtype = "float32"
        sample_latents: bool = False
        """Sample the VAE posterior instead of taking its mean."""
        text_encoders: bool = True
        """Load the text encoders (not needed when the data already holds embeddings)."""
        max_sequence_length: int = 512
        """T5 tokens per caption (padded or truncated), end token included."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        if not 1 <= config.max_sequence_length <= MAX_T5_TOKENS:
            raise UserError(f"codec flux: max_sequence_length must be 1 to {MAX_T5_TOKENS}, not {config.max_sequence_length}")
        self.config = config
        self.vae = load_pretrained(AutoencoderKL, config.pretrained, config.vae_subfolder, torch_dtype=DTYPES[config.vae_dtype])
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift = float(self.vae.config.shift_factor or 0.0)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        """Pixels per latent (8 for Flux's VAE; a token of the network covers 2x2 latents)."""
        self.text_encoder = self.text_encoder_2 = None
        if config.text_encoders:
            from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

            dtype = DTYPES[config.text_dtype]
            self.tokenizer = load_pretrained(CLIPTokenizer, config.pretrained, "tokenizer")
            self.tokenizer_2 = load_pretrained(T5TokenizerFast, config.pretrained, "tokenizer_2")
            self.text_encoder = load_pretrained(CLIPTextModel, config.pretrained, "text_encoder", torch_dtype=dtype)
            self.text_encoder_2 = load_pretrained(T5EncoderModel, config.pretrained, "text_encoder_2", torch_dtype=dtype)
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample() if self.config.sample_latents else posterior.mean
        return ((latents - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode((latents / self.scaling + self.shift).to(self.vae.dtype)).sample.float()

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
