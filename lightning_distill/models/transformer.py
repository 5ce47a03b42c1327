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
from lightning_distill.models.noise import (FlowMatchConfig, FlowMatchSchedule, NoiseSchedule, NoiseScheduleConfig,
                                           Schedule, schedule_from_pretrained)
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

    output_layers: tuple[str, ...] = ("norm_out", "proj_out")
    """The network's attributes after its blocks (output norm, modulation, projection): a discriminator trunk
    drops them, so that it keeps no parameter that never gets a gradient (DDP stops on those)."""

    text_output_layers: tuple[str, ...] = ("attn.to_add_out", "ff_context")
    """Layers of a joint block (paths inside it) that only make its text tokens for the next block: in a trunk's
    last block they feed nothing the discriminator reads, so the trunk drops them (diffusers' SD3 and Flux joint
    blocks: the text stream's attention output projection and feed-forward)."""

    def block_lists(self) -> list[nn.ModuleList]:
        """The network's block lists, the joint (token map) blocks first: what FSDP2 shards and a trunk cuts."""
        return [self.transformer.transformer_blocks]

    def trunk_block_limit(self) -> int:
        """How many of the first joint blocks a discriminator trunk may keep (each must give image tokens on)."""
        return len(self.block_lists()[0])

    def discriminator_trunk(self, blocks: int) -> TransformerDenoiser:
        """A copy of this denoiser cut after its first ``blocks`` joint blocks, for the ``transformer_blocks``
        backbone: later block lists emptied, :attr:`output_layers` and the last block's :attr:`text_output_layers`
        replaced by identities, so that every parameter left gets a gradient. A family whose network keeps its
        blocks or output layers elsewhere overrides this (or those attributes)."""
        trunk = copy.deepcopy(self)
        joint, *later = trunk.block_lists()
        del joint[blocks:]
        for blocks_after in later:
            del blocks_after[:]
        for name in self.output_layers:
            layer = getattr(trunk.transformer, name, None)
            if isinstance(layer, nn.Parameter):  # an output modulation table (PixArt's scale_shift_table)
                setattr(trunk.transformer, name, None)
            elif layer is not None:
                setattr(trunk.transformer, name, nn.Identity())
        last = joint[-1]
        for path in self.text_output_layers:
            parent, _, name = path.rpartition(".")
            try:
                owner = last.get_submodule(parent) if parent else last
            except AttributeError:  # a block without a text stream (cross-attention blocks): nothing to cut
                continue
            if isinstance(getattr(owner, name, None), nn.Module):
                setattr(owner, name, nn.Identity())
        return trunk

    def conditioning_dims(self) -> dict[str, int]:
        """The conditioning entries a multi-level discriminator's heads may read, with their widths (a token
        sequence's channels, a pooled embedding's): diffusers' SD3/Flux config names by default."""
        config = self.transformer.config
        return {"text": int(config.joint_attention_dim), "pooled": int(config.pooled_projection_dim)}

    def image_tokens(self, output: Any) -> Tensor:
        """The image tokens ``[B, N, D]`` in what one of :meth:`block_lists`' first blocks returns: joint blocks
        return ``(text tokens, image tokens)``; a family whose blocks return the image tokens alone overrides it."""
        return output[1]

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
                found[i] = self.image_tokens(output)
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
    """A frozen diffusers transformer with our sampler: on a flow-matching schedule (prediction ``flow``, SD3 and
    Flux) or, for a family that says so (``flow_matching = False``), on any discrete (betas) schedule with the
    prediction type its scheduler config names (``epsilon``, ``v_prediction``). A family subclasses it with its
    ``network_class`` and ``make_denoiser``; the loading and the sampling scheduler its exports get are these."""

    Config = TransformerTeacherConfig
    network_class: str
    """The diffusers class of the network (``SD3Transformer2DModel``, ``FluxTransformer2DModel``)."""
    network_folder = "transformer"
    flow_matching: bool = True
    """Whether the network was trained by flow matching (its schedule must then be ``flow_match``); False: a
    discrete schedule, read from the folder's ``scheduler/`` or ``method.teacher.noise_schedule``."""
    default_schedule: Any = FlowMatchConfig(shift=3.0)
    """The schedule when the folder has no scheduler config and the recipe names none (a flow family's)."""

    def __init__(self, config: TransformerTeacherConfig, *, seed: int = 0, empty: bool = False) -> None:
        import diffusers

        net = load_network(getattr(diffusers, self.network_class), config, empty)
        found = schedule_from_pretrained(config.pretrained)
        if config.noise_schedule is not None:
            schedule = config.noise_schedule.build()
        elif found:
            schedule = found[0]
        elif self.flow_matching:
            schedule = FlowMatchSchedule(self.default_schedule)
        else:  # a discrete family's own default, else SDXL's betas
            default = self.default_schedule
            schedule = NoiseSchedule(NoiseScheduleConfig() if isinstance(default, FlowMatchConfig) else default)
        if isinstance(schedule, FlowMatchSchedule) != self.flow_matching:
            want = "flow_match" if self.flow_matching else "a discrete (betas) one"
            raise UserError(f"method.teacher: {self.network_class} is {'' if self.flow_matching else 'not '}a "
                            f"flow-matching network here; its noise_schedule must be {want} (found "
                            f"{type(schedule).__name__} in {config.pretrained}/scheduler or the recipe)")
        if self.flow_matching:
            prediction = "flow"
        else:
            prediction = config.prediction or (found[1] if found else None) or "epsilon"
        super().__init__(self.make_denoiser(net, schedule, config), prediction=prediction, schedule=schedule)
        self.source = PretrainedSource(config.pretrained, config.subfolder, config.variant, config.dtype)

    def make_denoiser(self, net: nn.Module, schedule: Schedule, config: Any) -> TransformerDenoiser:
        raise NotImplementedError

    def sampling_scheduler(self, prediction: str) -> Any:
        """The folder's ``FlowMatchEulerDiscreteScheduler`` (its shift), or one of this schedule; the pipelines
        sample our trailing steps with ``sigmas = linspace(1, 1/n, n)``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        folder = Path(self.source.pretrained).expanduser() / "scheduler"
        if not self.flow_matching:  # Euler, trailing, the student's prediction: what our sampler reproduces
            from lightning_distill.models.teacher import lightning_scheduler

            base = FlowMatchEulerDiscreteScheduler.load_config(str(folder)) if folder.is_dir() else self.schedule.scheduler().config
            return lightning_scheduler(base, prediction)
        if prediction != "flow":
            raise UserError(f"a {self.network_class} student predicts 'flow'; it cannot be exported as {prediction!r}")
        if folder.is_dir():
            return FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder))
        return self.schedule.scheduler()


def _check_token_maps(denoiser: nn.Module, backbone: str, *more: str) -> None:
    """A transformer backbone needs a denoiser that gives token maps (the contract of :class:`TransformerDenoiser`,
    which a family's denoiser subclasses or imitates); anything else gets an error naming what to implement."""
    needed = ("token_maps", "token_grid", "block_lists", "trunk_block_limit", "conditioning_dims", *more)
    missing = [name for name in needed if not callable(getattr(denoiser, name, None))]
    if missing:
        raise UserError(f"backbone {backbone!r} needs a teacher whose denoiser gives image-token maps: "
                        f"{type(denoiser).__name__} lacks {', '.join(missing)} (subclass "
                        "lightning_distill.TransformerDenoiser, which defines them); for a UNet use unet_encoder")


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
        _check_token_maps(teacher.denoiser, "transformer_blocks", "discriminator_trunk")
        joint = len(teacher.denoiser.block_lists()[0])
        limit = teacher.denoiser.trunk_block_limit()
        self.blocks = config.blocks if config.blocks is not None else max(1, joint // 2)
        if not 1 <= self.blocks <= limit:
            raise UserError(f"method.discriminator.backbone.blocks: choose 1 to {limit} (the teacher has {joint} joint "
                            f"blocks), got {self.blocks}")
        self.checkpointing = config.gradient_checkpointing
        self.denoiser = teacher.denoiser.discriminator_trunk(self.blocks)
        net = self.denoiser.transformer
        self.to(DTYPES[config.dtype]).requires_grad_(True).train()
        self.out_channels = int(net.config.num_attention_heads * net.config.attention_head_dim)
        self.conditioning_dims = self.denoiser.conditioning_dims()

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.denoiser.token_maps(x, t, cond, [self.blocks], self.checkpointing)[0]

    @property
    def level_channels(self) -> list[int]:
        return [self.out_channels]

    def features(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        return [self(x, t, cond)]

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.denoiser.block_lists()[0])


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
        _check_token_maps(denoiser, "frozen_features")
        joint = len(denoiser.block_lists()[0])
        limit = denoiser.trunk_block_limit()
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
        self.conditioning_dims = denoiser.conditioning_dims()
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
