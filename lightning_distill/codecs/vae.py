"""What the diffusers families' codecs share: an ``AutoencoderKL`` (pixels <-> latents) loaded from a pipeline
folder or hub id, and the settings of its text encoders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_distill.codecs.base import Codec
from lightning_distill.utils.pretrained import load_pretrained
from lightning_distill.utils.tensors import DTYPES, Dtype


@dataclass(kw_only=True)
class VAECodecConfig:
    pretrained: str
    """Local pipeline folder or hub id."""
    vae_subfolder: str = "vae"
    vae_dtype: Dtype = "float32"
    """float32 (or bfloat16) is safe; SDXL's and SD1.5's VAEs overflow in float16 at high resolution."""
    text_dtype: Dtype = "float32"
    sample_latents: bool = False
    """Sample the VAE posterior instead of taking its mean."""
    text_encoders: bool = True
    """Load the text encoders (not needed when the data already holds embeddings)."""


class VAECodec(Codec):
    """The family's VAE: latents are ``(z - shift_factor) * scaling_factor`` (no shift for SD1.5 and SDXL);
    subclasses load their text encoders with :meth:`text_model`."""

    has_text = True  # encode_text says what to do when the recipe turned the encoders off

    def __init__(self, config: VAECodecConfig) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        self.config = config
        self.vae = load_pretrained(AutoencoderKL, config.pretrained, config.vae_subfolder, torch_dtype=DTYPES[config.vae_dtype])
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        """Pixels per latent (8 for the released VAEs)."""

    def text_model(self, cls: Any, subfolder: str) -> Any:
        """A tokenizer or text encoder of the pipeline (encoders in ``text_dtype``)."""
        dtype = {} if "Tokenizer" in cls.__name__ else {"torch_dtype": DTYPES[self.config.text_dtype]}
        return load_pretrained(cls, self.config.pretrained, subfolder, **dtype)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample() if self.config.sample_latents else posterior.mean
        return ((latents - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode((latents / self.scaling + self.shift).to(self.vae.dtype)).sample.float()
