"""Tiny conv networks for debug recipes and tests: a denoiser, its teacher, a discriminator backbone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.config.fields import component
from lightning_distill.models.noise import Prediction
from lightning_distill.errors import UserError
from lightning_distill.config.registry import BACKBONES, TEACHERS
from lightning_distill.models.teacher import SamplerTeacher


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of integer timesteps (as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


@dataclass(kw_only=True)
class ToyNetConfig:
    in_channels: int = 4
    channels: int = 32
    blocks: int = 2
    text_dim: int = 16
    groups: int = 8


class ToyDenoiser(nn.Module):
    """``forward(x, t, cond) -> output``: conv residual blocks conditioned on time and pooled text."""

    def __init__(self, config: ToyNetConfig) -> None:
        super().__init__()
        c = self.config = config
        self.conv_in = nn.Conv2d(c.in_channels, c.channels, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(c.channels, c.channels), nn.SiLU(), nn.Linear(c.channels, c.channels))
        self.text = nn.Linear(c.text_dim, c.channels)
        self.blocks = nn.ModuleList(ResBlock(c.channels, c.channels, c.groups) for _ in range(c.blocks))
        self.norm_out = nn.GroupNorm(c.groups, c.channels)
        self.conv_out = nn.Conv2d(c.channels, c.in_channels, 3, padding=1)

    def embed(self, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.time(timestep_embedding(t, self.config.channels)) + self.text(cond["pooled"])

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        dtype = self.conv_in.weight.dtype  # called unwrapped, the module casts its own inputs (bf16-true)
        cond = {k: v.to(dtype) for k, v in cond.items()}
        emb = self.embed(t, cond).to(dtype)
        h = self.conv_in(x.to(dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)

    @property
    def in_channels(self) -> int:
        return self.config.in_channels

    network = None
    """No diffusers format: toy students are not exported."""

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules sharded as their own FSDP2 units."""
        return list(self.blocks)


@TEACHERS.register("toy")
class ToyTeacher(SamplerTeacher):
    """A frozen :class:`ToyDenoiser` (random from the seed, or from a safetensors file) with the DDIM sampler."""

    @dataclass(kw_only=True)
    class Config:
        net: ToyNetConfig = field(default_factory=ToyNetConfig)
        weights: str | None = None
        """A safetensors state dict of the denoiser; None: random weights from the run's seed."""
        prediction: Prediction = "epsilon"
        noise_schedule: component("noise_schedule") = field(default_factory=lambda: {"name": "discrete"})  # type: ignore[valid-type]

    def __init__(self, config: Config, *, seed: int = 0, empty: bool = False) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = ToyDenoiser(config.net)
        if config.weights and not empty:
            from safetensors.torch import load_file

            net.load_state_dict(load_file(config.weights))
        super().__init__(net, prediction=config.prediction, schedule=config.noise_schedule.build())


@BACKBONES.register("toy")
class ToyBackbone(nn.Module):
    """The teacher's toy denoiser up to its last block, as discriminator features (a copy, fully trainable)."""

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Config, *, teacher: SamplerTeacher) -> None:
        super().__init__()
        import copy

        net = teacher.denoiser
        if not isinstance(net, ToyDenoiser):
            raise UserError(f"backbone 'toy' needs a toy teacher, got {type(net).__name__}; use unet_encoder for UNets")
        self.net = copy.deepcopy(net).requires_grad_(True)
        del self.net.norm_out, self.net.conv_out
        self.out_channels = net.config.channels
        self.conditioning_dims = {"pooled": net.config.text_dim}
        """Conditioning entries (and widths) a multi-level discriminator's heads may read."""

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.features(x, t, cond)[-1]

    @property
    def level_channels(self) -> list[int]:
        """Channels of each feature map ``features`` returns: one per block."""
        return [self.out_channels] * len(self.net.blocks)

    def features(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        emb = self.net.embed(t, cond)
        h = self.net.conv_in(x)
        maps = []
        for block in self.net.blocks:
            h = block(h, emb)
            maps.append(h)
        return maps
