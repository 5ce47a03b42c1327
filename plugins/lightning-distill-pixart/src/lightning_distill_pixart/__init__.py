"""PixArt-Sigma as a lightning-distill family, written against the package's public names only.

PixArt-Sigma (``PixArtTransformer2DModel``, ``PixArtSigmaPipeline``) is a DiT on a discrete (linear betas)
schedule that predicts epsilon and a learned variance, with T5 text embeddings and their attention mask and the
SD VAE. What the family declares, against the README's family contract:

- teacher ``pixart``: a :class:`lightning_distill.TransformerTeacher` with ``flow_matching = False`` (the
  schedule and prediction come from the folder's ``scheduler/``), the pipeline's extra call arguments
  (``pipeline_call``: no resolution binning, which would render at another size and resize; no caption cleaning,
  which needs bs4 and ftfy), and a denoiser that gives the discriminator its token maps;
- denoiser: blocks that take the text by cross-attention and return the image tokens alone (``image_tokens``),
  its output layers (``scale_shift_table`` is a parameter: a trunk drops it too), the conditioning its
  multi-level heads may read (``conditioning_dims``);
- codec ``pixart``: the VAE (:class:`lightning_distill.VAECodec`) and T5 with the pipeline's 300 tokens, giving
  ``text`` and its ``mask``; guidance's null is the empty caption's encoding, mask included (``null_keeps = ()``);
- ``plan``: the published configs of ``PixArt-alpha/PixArt-Sigma-XL-2-1024-MS`` and the codec's shapes and bytes,
  so that ``plan`` runs offline and builds nothing.

The pipeline has no ``load_lora_weights``: ``export --format lora`` and ``--format comfyui`` are refused and name
``--format diffusers`` (the engine reads that from the pipeline class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill import (CODECS, TEACHERS, TransformerDenoiser, TransformerTeacher, TransformerTeacherConfig,
                               UserError, VAECodec, VAECodecConfig)
from lightning_distill.models.architectures import register_config

HUB_ID = "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"
MAX_TOKENS = 300
"""T5 tokens per caption: what ``PixArtSigmaPipeline`` pads and truncates to by default."""
NO_SIZE_CONDITIONS = {"resolution": None, "aspect_ratio": None}
"""PixArt-Sigma's ``added_cond_kwargs``: it takes no size conditioning (``use_additional_conditions: false``)."""


class PixArtDenoiser(TransformerDenoiser):
    """``denoiser(x, t, cond)`` over a ``PixArtTransformer2DModel``: ``cond`` holds ``text`` (T5's last hidden
    states) and ``mask`` (its attention mask); the network is given the discrete timestep, as the pipeline gives
    it, and its learned-variance channels are dropped, as the pipeline drops them."""

    output_layers = ("norm_out", "scale_shift_table", "proj_out")
    text_output_layers = ()  # the blocks read the text by cross-attention and give no text tokens on
    lora_exclude = ["pos_embed", "adaln_single", "caption_projection", "norm_out", "scale_shift_table", "^proj_out"]

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def conditioning_dims(self) -> dict[str, int]:
        return {"text": int(self.transformer.config.caption_channels)}

    def image_tokens(self, output: Any) -> Tensor:
        return output  # a BasicTransformerBlock returns the image tokens alone

    def token_grid(self, x: Tensor) -> tuple[int, int]:
        p = self.transformer.config.patch_size
        return x.shape[-2] // p, x.shape[-1] // p

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        net = self.transformer
        dtype = net.dtype
        time = self.schedule.model_time(t, x).expand(x.shape[0])
        out = net(hidden_states=x.to(dtype), encoder_hidden_states=cond["text"].to(dtype), timestep=time,
                  added_cond_kwargs=NO_SIZE_CONDITIONS, encoder_attention_mask=cond.get("mask"), return_dict=False)[0]
        return out[:, : x.shape[1]].to(x.dtype)  # epsilon; the learned variance's channels are not sampled with

    def token_maps(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], after: list[int],
                   checkpoint: bool = False) -> list[Tensor]:
        """The image tokens after each block counted in ``after``, as ``[B, D, h, w]`` maps: the network's own
        forward up to there (patch embedding, timestep modulation, caption projection, masked cross-attention)."""
        net = self.transformer
        dtype = net.pos_embed.proj.weight.dtype
        B = x.shape[0]
        hidden = net.pos_embed(x.to(dtype))
        time = self.schedule.model_time(t, x).expand(B)
        modulation, _ = net.adaln_single(time, NO_SIZE_CONDITIONS, batch_size=B, hidden_dtype=hidden.dtype)
        text = net.caption_projection(cond["text"].to(dtype)).view(B, -1, hidden.shape[-1])
        mask = cond.get("mask")
        bias = None if mask is None else ((1 - mask.to(hidden.dtype)) * -10000.0).unsqueeze(1)  # as the network does
        maps = []
        for i, block in enumerate(list(net.transformer_blocks)[: max(after)], start=1):
            hidden = self.run_block(block, checkpoint, hidden, None, text, bias, modulation)
            if i in after:
                maps.append(hidden.transpose(1, 2).reshape(B, -1, *self.token_grid(x)))
        return maps


@TEACHERS.register("pixart")
class PixArtTeacher(TransformerTeacher):
    """A frozen ``PixArtTransformer2DModel`` (PixArt-Sigma, PixArt-Alpha) on its discrete schedule, with real CFG
    (the empty caption's encoding as the unconditional input, codec ``pixart``). Betas and prediction type come
    from the folder's ``scheduler/`` (PixArt-Sigma: linear betas, epsilon)."""

    network_class = "PixArtTransformer2DModel"
    pipeline_class = "PixArtSigmaPipeline"
    flow_matching = False
    pipeline_call = {"use_resolution_binning": False, "clean_caption": False}

    @dataclass(kw_only=True)
    class Config(TransformerTeacherConfig):
        pass

    def make_denoiser(self, net: nn.Module, schedule: Any, config: Any) -> PixArtDenoiser:
        return PixArtDenoiser(net, schedule)


@CODECS.register("pixart")
class PixArtCodec(VAECodec):
    """PixArt-Sigma's VAE and T5 encoder, as ``PixArtSigmaPipeline.encode_prompt`` uses them (no caption cleaning):
    ``{"text": [B, 300, T5 width], "mask": [B, 300]}``. An empty caption is encoded like any other, mask included
    (the pipeline's negative prompt)."""

    zero_null = False
    null_keeps = ()

    @dataclass(kw_only=True)
    class Config(VAECodecConfig):
        pass

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.text_encoder = None
        if config.text_encoders:
            from transformers import T5EncoderModel, T5TokenizerFast

            self.tokenizer = self.text_model(T5TokenizerFast, "tokenizer")
            self.text_encoder = self.text_model(T5EncoderModel, "text_encoder")
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def encode_text(self, captions: list[str], time_ids: Tensor | None = None) -> dict[str, Tensor]:
        if self.text_encoder is None:
            raise UserError("codec pixart: captions need the text encoder; set codec.text_encoders: true")
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer([c.lower().strip() for c in captions], padding="max_length", max_length=MAX_TOKENS,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        text = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"text": text.float(), "mask": mask.float()}

    @classmethod
    def plan_shapes(cls, resolution: int, config: dict[str, Any], net: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """What one sample's batch holds at ``resolution`` pixels, from the transformer's config (nothing built)."""
        side = resolution // 8
        return {"latents": (int(net["in_channels"]), side, side), "text": (MAX_TOKENS, int(net["caption_channels"])),
                "mask": (MAX_TOKENS,)}

    @classmethod
    def plan_bytes(cls, config: dict[str, Any]) -> int:
        """The SD VAE (83.7 M parameters) and, unless ``text_encoders`` is off, T5-v1.1-XXL's encoder (4.76 B)."""
        size = {"float32": 4, "float16": 2, "bfloat16": 2}
        text = 4_762_310_656 if config.get("text_encoders", True) else 0
        return 83_653_863 * size[config.get("vae_dtype", "float32")] + text * size[config.get("text_dtype", "float32")]


register_config(HUB_ID, "transformer", {
    "_class_name": "PixArtTransformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
    "attention_head_dim": 72, "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
    "double_self_attention": False, "dropout": 0.0, "in_channels": 4, "interpolation_scale": 2,
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 128, "upcast_attention": False,
    "use_additional_conditions": False, "use_linear_projection": False})
register_config(HUB_ID, "scheduler", {
    "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
    "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"})
