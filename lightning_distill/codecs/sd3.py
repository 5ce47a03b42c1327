"""Stable Diffusion 3's codec: the 16-channel VAE (with a shift) and the CLIP-L, CLIP-G and T5 text encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.codecs.base import Codec
from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError
from lightning_distill.utils.pretrained import load_pretrained
from lightning_distill.utils.tensors import DTYPES, Dtype

MAX_T5_TOKENS = 512
"""The longest T5 sequence SD3's and Flux's pipelines accept."""


@CODECS.register("sd3")
class SD3Codec(Codec):
    """SD3's VAE (latents ``(z - shift_factor) * scaling_factor``) and its three text encoders.

    ``encode_text(captions)`` follows ``StableDiffusion3Pipeline.encode_prompt``: ``text`` is the penultimate
    hidden states of CLIP-L and CLIP-G concatenated on channels, zero-padded to T5's width, then T5's last hidden
    states appended along the tokens (``[B, 77 + max_sequence_length, 4096]`` for SD3); ``pooled`` is the two CLIP
    projections concatenated (``[B, 2048]``). An empty caption is encoded like any other (the pipeline's negative
    prompt).
    """

    has_text = True  # encode_text says what to do when the recipe turned the encoders off
    zero_null = False

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
        t5: bool = True
        """Load T5 (about 4.7 B parameters); False: zeros in its place, as the pipeline does without
        ``text_encoder_3``."""
        max_sequence_length: int = 256
        """T5 tokens per caption (padded or truncated), end token included."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        if not 1 <= config.max_sequence_length <= MAX_T5_TOKENS:
            raise UserError(f"codec sd3: max_sequence_length must be 1 to {MAX_T5_TOKENS}, not {config.max_sequence_length}")
        self.config = config
        self.vae = load_pretrained(AutoencoderKL, config.pretrained, config.vae_subfolder, torch_dtype=DTYPES[config.vae_dtype])
        self.scaling = float(self.vae.config.scaling_factor)
        self.shift = float(self.vae.config.shift_factor or 0.0)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        """Pixels per latent (8 for SD3's VAE)."""
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        if config.text_encoders:
            from transformers import CLIPTextModelWithProjection, CLIPTokenizer

            dtype = DTYPES[config.text_dtype]
            self.tokenizer = load_pretrained(CLIPTokenizer, config.pretrained, "tokenizer")
            self.tokenizer_2 = load_pretrained(CLIPTokenizer, config.pretrained, "tokenizer_2")
            self.text_encoder = load_pretrained(CLIPTextModelWithProjection, config.pretrained, "text_encoder", torch_dtype=dtype)
            self.text_encoder_2 = load_pretrained(CLIPTextModelWithProjection, config.pretrained, "text_encoder_2", torch_dtype=dtype)
            if config.t5:
                from transformers import T5EncoderModel, T5TokenizerFast

                self.tokenizer_3 = load_pretrained(T5TokenizerFast, config.pretrained, "tokenizer_3")
                self.text_encoder_3 = load_pretrained(T5EncoderModel, config.pretrained, "text_encoder_3", torch_dtype=dtype)
            else:
                self.t5_width = joint_attention_dim(config.pretrained)
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
        """``{"text": [B, clip + t5 tokens, t5 width], "pooled": [B, clip-l + clip-g projections]}`` (``time_ids``:
        unused)."""
        if self.text_encoder is None:
            raise UserError("codec sd3: captions need the text encoders; set codec.text_encoders: true")
        captions = list(captions)
        device = next(self.text_encoder.parameters()).device
        states, pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            # both CLIPs are cut at the first tokenizer's length, as the pipeline does
            ids = tokenizer(
                captions, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled.append(out[0].float())  # text_embeds: the projected pooled output
        if self.text_encoder_3 is None:
            t5 = torch.zeros(len(captions), self.config.max_sequence_length, self.t5_width, device=device)
        else:
            ids = self.tokenizer_3(
                captions, padding="max_length", max_length=self.config.max_sequence_length, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids.to(device)
            t5 = self.text_encoder_3(ids)[0].float()
        clip = torch.cat(states, dim=-1)
        if clip.shape[-1] > t5.shape[-1]:
            raise UserError(f"codec sd3: the CLIP widths ({clip.shape[-1]}) exceed T5's ({t5.shape[-1]})")
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # CLIP's channels padded with zeros to T5's width
        return {"text": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}


def joint_attention_dim(pretrained: str) -> int:
    """The transformer's text width (T5's), read from the folder's ``transformer/config.json``."""
    from diffusers import SD3Transformer2DModel

    try:
        return int(SD3Transformer2DModel.load_config(pretrained, subfolder="transformer")["joint_attention_dim"])
    except (OSError, ValueError, KeyError) as err:
        raise UserError(
            f"codec sd3: with t5: false the T5 width is read from {pretrained!r}/transformer/config.json: {err}"
        ) from err
