"""What the flow-matching transformer families share: a teacher loaded from a diffusers folder, and the
discriminator backbone made of the first blocks of the teacher's transformer (the paper's design carried over).

A family (``models/sd3``, ``models/flux``) supplies a denoiser wrapping its diffusers network with
``forward(x, t, cond)`` and ``token_maps(x, t, cond, after)`` (the image tokens after each joint block counted in
``after``, text tokens stripped, as ``[B, D, h, w]`` maps).

Two discriminator backbones: ``transformer_blocks`` (a trainable copy of the first blocks: the paper's way) and
``frozen_features`` (the frozen teacher's features at chosen blocks, only the head trains: LADD / SANA-Sprint's
way, no second copy of the network's weights in memory).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.config.registry import BACKBONES
from lightning_distill.errors import UserError
from lightning_distill.models.noise import FlowMatchConfig, FlowMatchSchedule, Schedule, schedule_from_pretrained
from lightning_distill.models.teacher import PretrainedSource, PretrainedTeacherConfig, SamplerTeacher, load_network
from lightning_distill.utils.tensors import DTYPES, Dtype

TRANSFORMER_LORA_EXCLUDE = ["pos_embed", "x_embedder", "time_text_embed", "context_embedder", "norm_out", "norm1",
                            "norm1_context", "norm", "^proj_out"]
"""LoRA on attention and MLP linears only: not the embedders, the adaptive-norm modulations or the final
projection (``^``: from the network's top, so the single blocks' ``proj_out`` keeps its LoRA)."""


class TransformerDenoiser(nn.Module):
    """Base of the transformer denoisers: the diffusers network as ``transformer``, the schedule that gives its
    time, and what LoRA, FSDP2 and gradient checkpointing need."""

    lora_exclude = TRANSFORMER_LORA_EXCLUDE

    def __init__(self, transformer: nn.Module, schedule: Schedule) -> None:
        super().__init__()
        self.transformer = transformer
        self.schedule = schedule

    @property
    def network(self) -> nn.Module:
        """The diffusers network, as ``export`` saves it."""
        return self.transformer

    def block_lists(self) -> list[nn.ModuleList]:
        return [self.transformer.transformer_blocks]

    def fsdp_units(self) -> list[nn.Module]:
        return [b for blocks in self.block_lists() for b in blocks]

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def token_maps(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], after: list[int],
                   checkpoint: bool = False) -> list[Tensor]:
        raise NotImplementedError

    def token_grid(self, x: Tensor) -> tuple[int, int]:
        """The ``(h, w)`` grid of image tokens for latents ``x``."""
        raise NotImplementedError

    def token_maps_by_hooks(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], after: list[int],
                            run: Callable[[], Any] | None = None) -> list[Tensor]:
        """The same maps as :meth:`token_maps`, taken by forward hooks on the joint blocks during a whole forward
        (``run``, default this network's): what works when the network is sharded (FSDP2 gathers each unit's
        weights around its forward, which calling the embedders by hand would skip)."""
        blocks = self.block_lists()[0]
        found: dict[int, Tensor] = {}

        def keep(i: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                found[i] = output[1]  # joint blocks return (text tokens, image tokens)
            return hook

        handles = [blocks[i - 1].register_forward_hook(keep(i)) for i in after]
        try:
            run() if run is not None else self(x, t, cond)
        finally:
            for h in handles:
                h.remove()
        h, w = self.token_grid(x)
        return [found[i].transpose(1, 2).reshape(x.shape[0], -1, h, w) for i in after]

    @staticmethod
    def run_block(block: nn.Module, checkpoint: bool, *args: Any) -> Any:
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as recompute

            return recompute(block, *args, use_reentrant=False)
        return block(*args)


@dataclass(kw_only=True)
class TransformerTeacherConfig(PretrainedTeacherConfig):
    subfolder: str = "transformer"


class TransformerTeacher(SamplerTeacher):
    """A frozen diffusers transformer of a flow-matching family with the Euler sampler (prediction ``flow``)."""

    network_class: str
    """The diffusers class of the network (``SD3Transformer2DModel``, ``FluxTransformer2DModel``)."""
    network_folder = "transformer"
    default_schedule = FlowMatchConfig(shift=3.0)

    def __init__(self, config: TransformerTeacherConfig, *, seed: int = 0, empty: bool = False) -> None:
        import diffusers

        net = load_network(getattr(diffusers, self.network_class), config, empty)
        found = schedule_from_pretrained(config.pretrained)
        if config.noise_schedule is not None:
            schedule = config.noise_schedule.build()
        else:
            schedule = found[0] if found else FlowMatchSchedule(self.default_schedule)
        if not isinstance(schedule, FlowMatchSchedule):
            raise UserError(f"method.teacher: {self.network_class} is a flow-matching network; its noise_schedule "
                            f"must be flow_match (found {type(schedule).__name__} in {config.pretrained}/scheduler)")
        super().__init__(self.make_denoiser(net, schedule, config), prediction="flow", schedule=schedule)
        self.source = PretrainedSource(config.pretrained, config.subfolder, config.variant, config.dtype)

    def make_denoiser(self, net: nn.Module, schedule: Schedule, config: Any) -> TransformerDenoiser:
        raise NotImplementedError

    def sampling_scheduler(self, prediction: str) -> Any:
        """The folder's ``FlowMatchEulerDiscreteScheduler`` (its shift), or one of this schedule; the pipelines
        sample our trailing steps with ``sigmas = linspace(1, 1/n, n)``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if prediction != "flow":
            raise UserError(f"a {self.network_class} student predicts 'flow'; it cannot be exported as {prediction!r}")
        folder = Path(self.source.pretrained).expanduser() / "scheduler"
        if folder.is_dir():
            return FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
        return self.schedule.scheduler()


def _conditioning_dims(config: Any) -> dict[str, int]:
    """The text sequence's and the pooled embedding's widths a transformer reads."""
    return {"text": int(config.joint_attention_dim), "pooled": int(config.pooled_projection_dim)}


@BACKBONES.register("transformer_blocks")
class TransformerBlocks(nn.Module):
    """A trainable copy of the teacher transformer's embedders and first ``blocks`` blocks (SDXL-Lightning's
    encoder-as-discriminator carried over to transformers). Its image tokens, text tokens stripped, are reshaped
    to a ``[B, D, h, w]`` map for the conv head."""

    @dataclass(kw_only=True)
    class Config:
        blocks: int | None = None
        """How many of the first blocks (None: half of the joint blocks, at least one)."""
        dtype: Dtype = "float32"
        gradient_checkpointing: bool = False

    def __init__(self, config: Config, *, teacher: SamplerTeacher) -> None:
        super().__init__()
        if not isinstance(teacher.denoiser, TransformerDenoiser):
            raise UserError(f"backbone 'transformer_blocks' needs a transformer teacher (sd3, flux), got "
                            f"{type(teacher.denoiser).__name__}; use unet_encoder for UNets")
        joint = len(teacher.denoiser.block_lists()[0])
        limit = joint - 1 if joint > 1 else joint  # SD3's last joint block has no text output
        self.blocks = config.blocks if config.blocks is not None else max(1, joint // 2)
        if not 1 <= self.blocks <= limit:
            raise UserError(f"method.discriminator.backbone.blocks: choose 1 to {limit} (the teacher has {joint} joint "
                            f"blocks), got {self.blocks}")
        self.checkpointing = config.gradient_checkpointing
        self.denoiser = copy.deepcopy(teacher.denoiser)
        net = self.denoiser.transformer
        net.transformer_blocks = nn.ModuleList(list(net.transformer_blocks)[: self.blocks])
        for name in ("single_transformer_blocks",):
            if hasattr(net, name):
                setattr(net, name, nn.ModuleList())
        for name in ("norm_out", "proj_out"):  # the output layers are never used here
            if hasattr(net, name):
                setattr(net, name, nn.Identity())
        self.to(DTYPES[config.dtype]).requires_grad_(True).train()
        self.out_channels = int(net.config.num_attention_heads * net.config.attention_head_dim)
        self.conditioning_dims = _conditioning_dims(net.config)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.denoiser.token_maps(x, t, cond, [self.blocks], self.checkpointing)[0]

    @property
    def level_channels(self) -> list[int]:
        return [self.out_channels]

    def features(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        return [self(x, t, cond)]

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.denoiser.transformer.transformer_blocks)


@BACKBONES.register("frozen_features")
class FrozenFeatures(nn.Module):
    """The frozen teacher's own image tokens after chosen joint blocks, concatenated on channels (LADD,
    arXiv 2403.12015): nothing of the backbone trains, only the head, and no copy of the network is made.
    Gradients still reach the generated latents through the frozen weights.

    The teacher is referenced, not owned (it is not in the discriminator's state dict or optimizer). Under FSDP2,
    where the teacher is sharded, the features are taken by hooks during the teacher's own forward.
    """

    @dataclass(kw_only=True)
    class Config:
        blocks: list[int] | None = None
        """Features after these joint blocks (counted from 1); None: a quarter, half and three quarters of them."""
        gradient_checkpointing: bool = False

    def __init__(self, config: Config, *, teacher: SamplerTeacher) -> None:
        super().__init__()
        denoiser = teacher.denoiser
        if not isinstance(denoiser, TransformerDenoiser):
            raise UserError(f"backbone 'frozen_features' needs a transformer teacher (sd3, flux), got "
                            f"{type(denoiser).__name__}")
        joint = len(denoiser.block_lists()[0])
        limit = joint - 1 if joint > 1 else joint
        blocks = config.blocks or sorted({max(1, min(limit, round(joint * f))) for f in (0.25, 0.5, 0.75)})
        if any(not 1 <= b <= limit for b in blocks):
            raise UserError(f"method.discriminator.backbone.blocks: each in 1 to {limit} (the teacher has {joint} "
                            f"joint blocks), got {blocks}")
        self.blocks = sorted(set(blocks))
        self.checkpointing = config.gradient_checkpointing
        object.__setattr__(self, "_teacher", denoiser)  # not a submodule: not saved, not trained, not sharded here
        object.__setattr__(self, "_sampler", teacher)  # its root module, through which a sharded teacher runs
        width = int(denoiser.transformer.config.num_attention_heads * denoiser.transformer.config.attention_head_dim)
        self.out_channels = width * len(self.blocks)
        self.conditioning_dims = _conditioning_dims(denoiser.transformer.config)
        """Conditioning entries (and widths) a multi-level discriminator's heads may read."""

    @property
    def level_channels(self) -> list[int]:
        """Channels of each map ``features`` returns (one per chosen block)."""
        return [self.out_channels // len(self.blocks)] * len(self.blocks)

    def features(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        """The image-token maps after each chosen block. On a sharded teacher (FSDP2) they are taken by hooks
        during the teacher's own forward, which gathers its weights; else the blocks run directly, up to the last
        chosen one."""
        teacher: TransformerDenoiser = self._teacher  # type: ignore[assignment]
        if any(type(p).__name__ == "DTensor" for p in teacher.transformer.parameters()):
            sampler = self._sampler
            return teacher.token_maps_by_hooks(x, t, cond, self.blocks, run=lambda: sampler(x, t, cond, raw=True))
        return teacher.token_maps(x, t, cond, self.blocks, self.checkpointing)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return torch.cat(self.features(x, t, cond), dim=1)
