"""Stable Diffusion 3's codec: the 16-channel VAE (with a shift) and the CLIP-L, CLIP-G and T5 text encoders."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.codecs.vae import VAECodec, VAECodecConfig
from lightning_distill.config.registry import CODECS
from lightning_distill.errors import UserError

MAX_T5_TOKENS = 512
"""The longest T5 sequence SD3's and Flux's pipelines accept."""


@CODECS.register("sd3")
class SD3Codec(VAECodec):
    """SD3's VAE (latents ``(z - shift_factor) * scaling_factor``) and its three text encoders.

    ``encode_text(captions)`` follows ``StableDiffusion3Pipeline.encode_prompt``: ``text`` is the penultimate
    hidden states of CLIP-L and CLIP-G concatenated on channels, zero-padded to T5's width, then T5's last hidden
    states appended along the tokens (``[B, 77 + max_sequence_length, 4096]`` for SD3); ``pooled`` is the two CLIP
    projections concatenated (``[B, 2048]``). An empty caption is encoded like any other (the pipeline's negative
    prompt).
    """

    zero_null = False

    @dataclass(kw_only=True)
    class Config(VAECodecConfig):
        t5: bool = True
        """Load T5 (about 4.7 B parameters); False: zeros in its place, as the pipeline does without
        ``text_encoder_3``."""
        max_sequence_length: int = 256
        """T5 tokens per caption (padded or truncated), end token included."""

    def __init__(self, config: Config) -> None:
        if not 1 <= config.max_sequence_length <= MAX_T5_TOKENS:
            raise UserError(f"codec sd3: max_sequence_length must be 1 to {MAX_T5_TOKENS}, not {config.max_sequence_length}")
        super().__init__(config)
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        if config.text_encoders:
            from transformers import CLIPTextModelWithProjection, CLIPTokenizer

            self.tokenizer = self.text_model(CLIPTokenizer, "tokenizer")
            self.tokenizer_2 = self.text_model(CLIPTokenizer, "tokenizer_2")
            self.text_encoder = self.text_model(CLIPTextModelWithProjection, "text_encoder")
            self.text_encoder_2 = self.text_model(CLIPTextModelWithProjection, "text_encoder_2")
            if config.t5:
                from transformers import T5EncoderModel, T5TokenizerFast

                self.tokenizer_3 = self.text_model(T5TokenizerFast, "tokenizer_3")
                self.text_encoder_3 = self.text_model(T5EncoderModel, "text_encoder_3")
            else:
                self.t5_width = joint_attention_dim(config.pretrained)
        self.requires_grad_(False).eval()

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
