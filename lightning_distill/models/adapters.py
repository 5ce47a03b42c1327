"""What of a student trains: the whole network, or LoRA adapters through peft (merged back between phases)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_distill.config.registry import ADAPTERS


@ADAPTERS.register("full")
class Full:
    """Every parameter trains."""

    @dataclass(kw_only=True)
    class Config:
        pass

    def __init__(self, config: Config | None = None) -> None:
        self.config = config

    def apply(self, module: nn.Module) -> nn.Module:
        return module.requires_grad_(True)

    def merge_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        return state


@ADAPTERS.register("lora")
class LoRA:
    """LoRA on every ``nn.Linear`` and ``nn.Conv2d`` except excluded ones (LCM-LoRA's rule by default: not the
    input/output convs, not the shared time and added embeddings); the base weights are frozen.

    ``merge_state`` folds ``W + (alpha / rank) B A`` into plain weights with the original key names, so the
    next phase (or the next stage's teacher) loads a plain network.
    """

    @dataclass(kw_only=True)
    class Config:
        rank: int = 64
        alpha: float | None = None
        """Scale numerator; None: equal to rank (scale 1)."""
        dropout: float = 0.0
        exclude: list[str] = field(default_factory=lambda: ["conv_in", "conv_out", "time_embedding", "add_embedding"])
        """Module names (any dotted component) left without LoRA."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def targets(self, module: nn.Module) -> list[str]:
        excluded = set(self.config.exclude)
        return [
            name
            for name, m in module.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name and not excluded.intersection(name.split("."))
        ]

    def apply(self, module: nn.Module) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        c = self.config
        module.requires_grad_(False)
        peft_config = LoraConfig(
            r=c.rank, lora_alpha=c.alpha if c.alpha is not None else c.rank, lora_dropout=c.dropout,
            target_modules=self.targets(module), init_lora_weights=True,
        )
        inject_adapter_in_model(peft_config, module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
        return module

    def merge_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        c = self.config
        scale = (c.alpha if c.alpha is not None else c.rank) / c.rank
        merged: dict[str, Tensor] = {}
        for key, value in state.items():
            if ".lora_" in key:
                continue
            m = re.match(r"^(.*)\.base_layer\.(weight|bias)$", key)
            if not m:
                merged[key] = value
                continue
            prefix, kind = m.groups()
            if kind == "weight" and f"{prefix}.lora_A.default.weight" in state:
                a = state[f"{prefix}.lora_A.default.weight"].float()
                b = state[f"{prefix}.lora_B.default.weight"].float()
                if value.ndim == 4:  # conv: A is (r, in, k, k), B is (out, r, 1, 1)
                    delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
                else:
                    delta = b @ a
                value = (value.float() + scale * delta).to(value.dtype)
            merged[f"{prefix}.{kind}"] = value
        return merged
