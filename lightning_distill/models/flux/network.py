"""Flux through diffusers: ``FluxTransformer2DModel`` as teacher, student and discriminator backbone. Loads with
``from_pretrained`` from a local folder or a hub id laid out like ``black-forest-labs/FLUX.1-dev``.

Latents stay ``[B, 16, H, W]`` everywhere else; the denoiser packs them into 2×2 patches (``FluxPipeline``'s
``_pack_latents``), builds ``img_ids``/``txt_ids`` and unpacks the output. FLUX.1-dev is guidance-distilled: no
classifier-free guidance, an **embedded guidance** value instead, which the teacher (and the students copied from
it) are always given (``method.teacher.guidance``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.config.registry import TEACHERS
from lightning_distill.errors import UserError
from lightning_distill.models.noise import FlowMatchConfig, Schedule
from lightning_distill.models.transformer import TransformerDenoiser, TransformerTeacher, TransformerTeacherConfig


def pack(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H/2 · W/2, 4C]``, as ``FluxPipeline._pack_latents``."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(x: Tensor, H: int, W: int) -> Tensor:
    """The inverse of :func:`pack`."""
    B, _, D = x.shape
    return x.view(B, H // 2, W // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, H, W)


def image_ids(h: int, w: int, device: Any, dtype: torch.dtype) -> Tensor:
    """Positions of the packed tokens: ``(0, row, column)`` each, as ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


class FluxDenoiser(TransformerDenoiser):
    """``denoiser(x, t, cond)`` over a ``FluxTransformer2DModel``: ``cond`` holds ``text`` (T5) and ``pooled``
    (CLIP); the network is given ``σ`` (it multiplies by 1000 itself) and, when it embeds guidance, ``guidance``."""

    def __init__(self, transformer: nn.Module, schedule: Schedule, guidance: float) -> None:
        super().__init__(transformer, schedule)
        self.guidance = guidance

    @property
    def in_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def block_lists(self) -> list[nn.ModuleList]:
        return [self.transformer.transformer_blocks, self.transformer.single_transformer_blocks]

    def _inputs(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        net = self.transformer
        dtype = next(net.parameters()).dtype
        B, _, H, W = x.shape
        text = cond["text"].to(dtype)
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance, device=x.device, dtype=torch.float32)
        return dict(
            hidden_states=pack(x.to(dtype)), timestep=(self.schedule.model_time(t, x).expand(B) / 1000).to(dtype),
            guidance=guidance, pooled_projections=cond["pooled"].to(dtype), encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=image_ids(H // 2, W // 2, x.device, dtype),
        )

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out = self.transformer(**self._inputs(x, t, cond), return_dict=False)[0]
        return unpack(out, *x.shape[-2:]).to(x.dtype)

    def token_grid(self, x: Tensor) -> tuple[int, int]:
        return x.shape[-2] // 2, x.shape[-1] // 2  # 2x2 packed latents

    def token_maps(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], after: list[int],
                   checkpoint: bool = False) -> list[Tensor]:
        net = self.transformer
        a = self._inputs(x, t, cond)
        hidden = net.x_embedder(a["hidden_states"])
        dtype = hidden.dtype
        time = a["timestep"].to(dtype) * 1000
        if a["guidance"] is None:
            temb = net.time_text_embed(time, a["pooled_projections"])
        else:
            temb = net.time_text_embed(time, a["guidance"].to(dtype) * 1000, a["pooled_projections"])
        text = net.context_embedder(a["encoder_hidden_states"])
        rotary = net.pos_embed(torch.cat([a["txt_ids"], a["img_ids"]]))
        B, _, H, W = x.shape
        maps = []
        for i, block in enumerate(list(net.transformer_blocks)[: max(after)], start=1):
            text, hidden = self.run_block(block, checkpoint, hidden, text, temb, rotary)
            if i in after:
                maps.append(hidden.transpose(1, 2).reshape(B, -1, *self.token_grid(x)))
        return maps


@TEACHERS.register("flux")
class FluxTeacher(TransformerTeacher):
    """A frozen ``FluxTransformer2DModel`` with the flow-matching Euler sampler and embedded guidance (no CFG).
    The shift comes from the folder's ``scheduler/`` (FLUX.1: dynamic, from the image's token count)."""

    network_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    default_schedule = FlowMatchConfig(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)

    @dataclass(kw_only=True)
    class Config(TransformerTeacherConfig):
        guidance: float = 3.5
        """The embedded guidance value the teacher, and every student copied from it, is given (FLUX.1-dev:
        3.5); ignored by networks without guidance embedding (FLUX.1-schnell)."""

    def make_denoiser(self, net: nn.Module, schedule: Schedule, config: Any) -> FluxDenoiser:
        return FluxDenoiser(net, schedule, config.guidance)

    def __init__(self, config: Config, *, seed: int = 0, empty: bool = False) -> None:
        super().__init__(config, seed=seed, empty=empty)
        self.embedded_guidance = config.guidance if self.denoiser.transformer.config.guidance_embeds else 0.0

    def predict(
        self, x: Tensor, t: Tensor, cond: dict[str, Tensor], guidance: float = 0.0, null: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        if guidance > 1:
            raise UserError("Flux takes no classifier-free guidance: set the phases' guidance to 0 and the embedded "
                            "guidance with method.teacher.guidance")
        return super().predict(x, t, cond, guidance, null)
