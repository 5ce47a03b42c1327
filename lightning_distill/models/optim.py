"""Optimizer factories: ``fn(config, params, *, lr, betas, weight_decay) -> Optimizer``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lightning_distill.errors import UserError
from lightning_distill.config.registry import OPTIMIZERS


@OPTIMIZERS.register("adam")
class Adam:
    """``torch.optim.Adam`` (the paper's optimizer)."""

    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-8
        foreach: bool | None = None
        """None lets torch choose; False forces the per-parameter loop."""

    def __new__(cls, config: Config, params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float):
        return torch.optim.Adam(
            params, lr=lr, betas=betas, weight_decay=weight_decay, eps=config.eps, foreach=config.foreach
        )


@OPTIMIZERS.register("adamw")
class AdamW:
    """``torch.optim.AdamW`` (decoupled weight decay)."""

    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-8

    def __new__(cls, config: Config, params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=config.eps)


@OPTIMIZERS.register("adam8bit")
class Adam8bit:
    """bitsandbytes' 8-bit Adam: optimizer state in 8 bits (a quarter of Adam's memory), for CUDA devices."""

    @dataclass(kw_only=True)
    class Config:
        eps: float = 1e-8
        block_wise: bool = True

    def __new__(cls, config: Config, params: Iterable, *, lr: float, betas: tuple[float, float], weight_decay: float):
        try:
            import bitsandbytes as bnb
        except ImportError as err:  # pragma: no cover - depends on the platform
            raise UserError(f"optimizer adam8bit needs bitsandbytes: {err}") from err
        return bnb.optim.Adam8bit(
            params, lr=lr, betas=betas, weight_decay=weight_decay, eps=config.eps, block_wise=config.block_wise
        )
