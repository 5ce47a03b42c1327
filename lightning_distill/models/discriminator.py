"""Discriminators: a backbone (features of a latent at a timestep, text-conditioned) and a head (logits)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_distill.config.fields import PositiveInt, Spec, component
from lightning_distill.config.registry import DISCRIMINATORS, HEADS
from lightning_distill.models.teacher import SamplerTeacher


def zero_projection(layer: nn.Module) -> None:
    """Zero a head's last projection (weights and bias): the discriminator starts at chance with every logit 0.

    A default-initialised projection gives every sample an offset (its bias, and whatever features the teacher's and
    the student's sample from the same ``x_t`` share). From zero, the first gradient on the projection is
    ``Σ (f_fake - f_real) / 2`` over the pairs (the logits' derivatives are ∓½ at 0): only what differs between real
    and fake. The gradients into the layers below flow once the projection has moved (one step). Off by default:
    the flow discriminator probe (``recipes/tiny/probes/discriminator_init.yaml``) measured no faster rise of the
    accuracy from it.
    """
    nn.init.zeros_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


@HEADS.register("conv")
class ConvHead(nn.Module):
    """{4×4 stride-2 conv, GroupNorm, SiLU} blocks, then a 1×1 projection to one logit per position, averaged."""

    @dataclass(kw_only=True)
    class Config:
        channels: PositiveInt = 64
        blocks: PositiveInt = 1
        groups: PositiveInt = 32
        zero_init: bool = False
        """The 1×1 projection starts at zero: every logit 0, chance with no offset (see ``zero_projection``)."""

    def __init__(self, config: Config, *, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(config.blocks):
            layers += [
                nn.Conv2d(c, config.channels, 4, stride=2, padding=1),
                nn.GroupNorm(min(config.groups, config.channels), config.channels),
                nn.SiLU(),
            ]
            c = config.channels
        layers.append(nn.Conv2d(c, 1, 1))
        if config.zero_init:
            zero_projection(layers[-1])
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).flatten(1).mean(1)


@DISCRIMINATORS.register("backbone_head")
class BackboneHead(nn.Module):
    """``D(x_{t-ns}, t-ns, c)`` or, conditional, ``D(x_t, x_{t-ns}, t, t-ns, c)``: both latents through the
    shared backbone (each at its own timestep), features concatenated on channels before the head."""

    @dataclass(kw_only=True)
    class Config:
        backbone: component("backbone")  # type: ignore[valid-type]
        """toy for toy teachers, unet_encoder for diffusers UNets."""
        head: component("head") = field(default_factory=lambda: {"name": "conv"})  # type: ignore[valid-type]

    def __init__(self, config: Config, *, teacher: SamplerTeacher, conditional: bool) -> None:
        super().__init__()
        backbone: Spec = config.backbone
        head: Spec = config.head
        self.conditional = conditional
        self.backbone = backbone.build(teacher=teacher)
        channels = self.backbone.out_channels * (2 if conditional else 1)
        self.head = head.build(in_channels=channels)

    def forward(
        self, x_prev: Tensor, t_prev: Tensor, cond: dict[str, Tensor], x_t: Tensor | None = None, t: Tensor | None = None
    ) -> Tensor:
        if not self.conditional:
            return self.head(self.backbone(x_prev, t_prev.clamp(min=0), cond))
        assert x_t is not None and t is not None, "a conditional discriminator needs x_t and t"
        n = x_prev.shape[0]
        both = {k: torch.cat([v, v]) for k, v in cond.items()}
        feats = self.backbone(torch.cat([x_t, x_prev]), torch.cat([t, t_prev.clamp(min=0)]), both)
        return self.head(torch.cat([feats[:n], feats[n:]], dim=1))

    def fsdp_units(self) -> list[nn.Module]:
        return [self.backbone, self.head]


class ConditionedHead(nn.Module):
    """One feature map's head in a multi-level discriminator: {4×4 stride-2 conv, GroupNorm} blocks, the features
    modulated by the conditioning embedding (scale and shift: noise level and text), SiLU, then a 1×1 conv to a
    logit per position, averaged."""

    def __init__(
        self, in_channels: int, channels: int, blocks: int, groups: int, embed_dim: int, zero_init: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(blocks):
            layers.append(nn.Conv2d(c, channels, 4, stride=2, padding=1) if i < blocks - 1 or blocks == 1 else
                          nn.Conv2d(c, channels, 3, padding=1))
            layers.append(nn.GroupNorm(min(groups, channels), channels))
            if i < blocks - 1:
                layers.append(nn.SiLU())
            c = channels
        self.body = nn.Sequential(*layers)
        self.modulation = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.modulation.weight)  # starts as an unconditioned head
        nn.init.zeros_(self.modulation.bias)
        self.out = nn.Conv2d(channels, 1, 1)
        if zero_init:
            zero_projection(self.out)

    def forward(self, features: Tensor, emb: Tensor) -> Tensor:
        h = self.body(features)
        scale, shift = self.modulation(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        return self.out(nn.functional.silu(h * (1 + scale) + shift)).flatten(1).mean(1)


@DISCRIMINATORS.register("multilevel")
class MultiLevel(nn.Module):
    """LADD-style discriminator (Sauer et al. 2024; SANA-Sprint): the backbone's feature maps at several levels
    (``backbone.features``: a UNet encoder's resolutions, a transformer's blocks), one light head per map, each
    conditioned on the noise level the sample is judged at and on the text (mean of its tokens, plus the pooled
    embedding where the codec gives one), logits averaged over the heads.

    With a frozen backbone (``unet_encoder`` with ``frozen: true``, ``frozen_features``) only the heads train.
    Conditional: the maps of ``x_t`` and ``x_{t-ns}`` are concatenated per level, as in ``backbone_head``.
    """

    @dataclass(kw_only=True)
    class Config:
        backbone: component("backbone")  # type: ignore[valid-type]
        """A backbone with several levels: unet_encoder (its levels), frozen_features (its blocks), toy."""
        channels: PositiveInt = 64
        blocks: PositiveInt = 1
        groups: PositiveInt = 32
        embed_dim: PositiveInt = 128
        """Width of the conditioning embedding (noise level and text) the heads are modulated by."""
        text: bool = True
        """Condition the heads on the text as well as on the noise level."""
        zero_init: bool = False
        """Each head's last projection starts at zero (every logit 0: chance with no offset; see ``zero_projection``)."""

    head_prefixes = ("heads.",)
    """State keys that depend on the conditioning: a phase that changes it starts them afresh."""

    def __init__(self, config: Config, *, teacher: SamplerTeacher, conditional: bool) -> None:
        super().__init__()
        from lightning_distill.errors import UserError

        backbone: Spec = config.backbone
        self.conditional = conditional
        self.backbone = backbone.build(teacher=teacher)
        if not hasattr(self.backbone, "features") or not hasattr(self.backbone, "level_channels"):
            raise UserError(f"method.discriminator: backbone {backbone.name!r} gives one feature map; 'multilevel' needs "
                            "a backbone with features() and level_channels (unet_encoder, frozen_features, toy)")
        factor = 2 if conditional else 1
        self.heads = nn.ModuleList(
            ConditionedHead(c * factor, config.channels, config.blocks, config.groups, config.embed_dim, config.zero_init)
            for c in self.backbone.level_channels
        )
        d = config.embed_dim
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        # one projection per conditioning entry the backbone names (token sequences are averaged first)
        dims: dict[str, int] = getattr(self.backbone, "conditioning_dims", {}) if config.text else {}
        self.text_proj = nn.ModuleDict({key: nn.Linear(width, d) for key, width in dims.items()})

    def _embedding(self, t: Tensor, cond: dict[str, Tensor], n: int, device: torch.device) -> Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        dtype = self.time_embed[0].weight.dtype
        level = get_timestep_embedding(t.float().clamp(min=0).reshape(-1).to(device), self.time_embed[0].in_features)
        emb = self.time_embed(level.to(dtype))
        for key, proj in self.text_proj.items():
            if key in cond:
                c = cond[key].to(device)
                emb = emb + proj((c.float().mean(1) if c.ndim == 3 else c.float()).to(dtype))
        return emb.expand(n, -1) if emb.shape[0] == 1 else emb

    def forward(
        self, x_prev: Tensor, t_prev: Tensor, cond: dict[str, Tensor], x_t: Tensor | None = None, t: Tensor | None = None
    ) -> Tensor:
        t_prev = t_prev.clamp(min=0)
        n = x_prev.shape[0]
        emb = self._embedding(t_prev, cond, n, x_prev.device)
        if not self.conditional:
            maps = self.backbone.features(x_prev, t_prev, cond)
        else:
            assert x_t is not None and t is not None, "a conditional discriminator needs x_t and t"
            both = {k: torch.cat([v, v]) for k, v in cond.items()}
            pairs = self.backbone.features(torch.cat([x_t, x_prev]), torch.cat([t.expand(n), t_prev.expand(n)]), both)
            maps = [torch.cat([m[:n], m[n:]], dim=1) for m in pairs]
        logits = [head(m, emb) for head, m in zip(self.heads, maps)]
        return torch.stack(logits).mean(0)

    def fsdp_units(self) -> list[nn.Module]:
        units = getattr(self.backbone, "fsdp_units", lambda: [])()
        return [*units, *self.heads]
