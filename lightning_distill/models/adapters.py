"""What of a student trains: the whole network, or LoRA adapters through peft (merged back between phases)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_distill.config.registry import ADAPTERS


UNET_LORA_EXCLUDE = ["conv_in", "conv_out", "time_embedding", "add_embedding"]
"""LCM-LoRA's rule for UNets."""


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
    """LoRA on every ``nn.Linear`` and ``nn.Conv2d`` except excluded ones, the base weights frozen. The network
    declares its rule (``lora_exclude``): for UNets LCM-LoRA's (not the input/output convs, not the shared time
    and added embeddings), for transformers the attention and MLP linears only.

    ``merge_state`` folds ``W + (alpha / rank) B A`` into plain weights with the original key names, so the
    next phase (or the next stage's teacher) loads a plain network.
    """

    @dataclass(kw_only=True)
    class Config:
        rank: int = 64
        alpha: float | None = None
        """Scale numerator; None: equal to rank (scale 1)."""
        dropout: float = 0.0
        exclude: list[str] | None = None
        """Module names left without LoRA: a name matches any dotted component, ``^name`` only from the network's
        top. None: the network's own rule (UNets: conv_in, conv_out, time_embedding, add_embedding)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def exclusions(self, module: nn.Module) -> list[str]:
        """The rule in force for ``module``: the recipe's, else the network's, else the UNet rule."""
        if self.config.exclude is not None:
            return list(self.config.exclude)
        return list(getattr(module, "lora_exclude", UNET_LORA_EXCLUDE))

    def targets(self, module: nn.Module) -> list[str]:
        """Names of the targeted layers. On a denoiser wrapper (one with a ``network``) names are matched
        relative to that network and returned with the wrapper's prefix (``unet.``, ``transformer.``)."""
        exclude = self.exclusions(module)
        top = {e[1:] for e in exclude if e.startswith("^")}
        anywhere = {e for e in exclude if not e.startswith("^")}
        network, prefix = module, ""
        inner = getattr(module, "network", None)
        if isinstance(inner, nn.Module) and inner is not module:
            prefix = next(n for n, m in module.named_children() if m is inner) + "."
            network = inner
        found = []
        for name, m in network.named_modules():
            if not name or not isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            parts = name.split(".")
            if anywhere.intersection(parts) or any(name == t or name.startswith(t + ".") for t in top):
                continue
            found.append(prefix + name)
        return found

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
