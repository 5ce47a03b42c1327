"""Stable Diffusion 3 / 3.5 through diffusers: ``SD3Transformer2DModel`` as teacher, student and discriminator
backbone. Loads with ``from_pretrained`` from a local folder or a hub id laid out like
``stabilityai/stable-diffusion-3.5-medium`` (``transformer/``, ``scheduler/``, ...). Classifier-free guidance is
real (two passes), with the empty caption's encoding as the unconditional input (codec ``sd3``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.config.registry import TEACHERS
from lightning_distill.models.noise import FlowMatchConfig, Schedule
from lightning_distill.models.transformer import TransformerDenoiser, TransformerTeacher, TransformerTeacherConfig


class SD3Denoiser(TransformerDenoiser):
    """``denoiser(x, t, cond)`` over an ``SD3Transformer2DModel``: ``cond`` holds ``text`` (the joint CLIP + T5
    sequence) and ``pooled``; the network is given ``σ·1000``, as ``StableDiffusion3Pipeline`` gives it."""

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def trunk_block_limit(self) -> int:
        joint = len(self.block_lists()[0])
        return joint - 1 if joint > 1 else joint  # the last joint block gives no text tokens on (context_pre_only)

    def token_grid(self, x: Tensor) -> tuple[int, int]:
        p = self.transformer.config.patch_size
        return x.shape[-2] // p, x.shape[-1] // p

    def pooled(self, cond: dict[str, Tensor], like: Tensor) -> Tensor:
        """``cond["pooled"]``; zeros for a codec without pooled embeddings (the tiny world's MiniLM)."""
        pooled = cond.get("pooled")
        if pooled is None:
            return torch.zeros(like.shape[0], self.transformer.config.pooled_projection_dim, device=like.device)
        return pooled

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        net = self.transformer
        dtype = net.dtype
        time = self.schedule.model_time(t, x).expand(x.shape[0])
        out = net(hidden_states=x.to(dtype), timestep=time.to(dtype), encoder_hidden_states=cond["text"].to(dtype),
                  pooled_projections=self.pooled(cond, x).to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def token_maps(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], after: list[int],
                   checkpoint: bool = False) -> list[Tensor]:
        net = self.transformer
        dtype = net.pos_embed.proj.weight.dtype
        B, _, h, w = x.shape
        hidden = net.pos_embed(x.to(dtype)).contiguous()
        time = self.schedule.model_time(t, x).expand(B).to(dtype)
        temb = net.time_text_embed(time, self.pooled(cond, x).to(dtype))
        text = net.context_embedder(cond["text"].to(dtype))
        p = net.config.patch_size
        maps = []
        for i, block in enumerate(list(net.transformer_blocks)[: max(after)], start=1):
            text, hidden = self.run_block(block, checkpoint, hidden, text, temb)
            if i in after:
                maps.append(hidden.transpose(1, 2).reshape(B, -1, *self.token_grid(x)))
        return maps


@TEACHERS.register("sd3")
class SD3Teacher(TransformerTeacher):
    """A frozen ``SD3Transformer2DModel`` (SD3, SD3.5) with the flow-matching Euler sampler and real CFG. The
    shift comes from the folder's ``scheduler/`` (SD3: 3.0)."""

    network_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    default_schedule = FlowMatchConfig(shift=3.0)

    @dataclass(kw_only=True)
    class Config(TransformerTeacherConfig):
        pass

    def make_denoiser(self, net: nn.Module, schedule: Schedule, config: Any) -> SD3Denoiser:
        return SD3Denoiser(net, schedule)
