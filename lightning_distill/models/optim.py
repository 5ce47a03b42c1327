"""Optimizer factories: ``fn(config, params, *, lr, betas, weight_decay) -> Optimizer``; each carries its typed
``Config`` as a function attribute (the registry validates a recipe's fields against it)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from lightning_distill.config.registry import OPTIMIZERS
from lightning_distill.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def configured(config: type) -> Callable[[F], F]:
    """Attach ``config`` to a factory function as its ``Config``."""

    def attach(fn: F) -> F:
        fn.Config = config  # type: ignore[attr-defined]
        return fn

    return attach


@dataclass(kw_only=True)
class AdamConfig:
    eps: float = 1e-8
    foreach: bool | None = None
    """None lets torch choose; False forces the per-parameter loop."""


@OPTIMIZERS.register("adam")
@configured(AdamConfig)
def adam(config: AdamConfig, params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float) -> Any:
    """``torch.optim.Adam`` (the paper's optimizer)."""
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=config.eps, foreach=config.foreach)


@dataclass(kw_only=True)
class AdamWConfig:
    eps: float = 1e-8


@OPTIMIZERS.register("adamw")
@configured(AdamWConfig)
def adamw(config: AdamWConfig, params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float) -> Any:
    """``torch.optim.AdamW`` (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=config.eps)


@dataclass(kw_only=True)
class Adam8bitConfig:
    eps: float = 1e-8
    block_wise: bool = True


@OPTIMIZERS.register("adam8bit")
@configured(Adam8bitConfig)
def adam8bit(config: Adam8bitConfig, params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float) -> Any:
    """bitsandbytes' 8-bit Adam: optimizer state in 8 bits (a quarter of Adam's memory), for CUDA devices."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - depends on the platform
        raise UserError(f"optimizer adam8bit needs bitsandbytes: {err}") from err
    return bnb.optim.Adam8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=config.eps,
                              block_wise=config.block_wise)
