"""Exponential moving average of a trained module's weights, kept per rank (works on sharded parameters)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.config.registry import CALLBACKS
from lightning_distill.callbacks.base import Callback


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor shard under FSDP2


@CALLBACKS.register("ema")
class EMA(Callback):
    """``shadow = decay * shadow + (1 - decay) * param`` after every step of every phase that trains ``module`` (of
    the ``kinds`` listed), from its ``start``-th iteration on (until then the shadow follows the weights).

    The shadow restarts from the live weights at each phase start. With ``use_at_phase_end`` the averaged weights
    replace the live ones when a phase ends, so the phase hands the average to the next phase, the next stage's
    teacher and ``export``. ``swap(modules)`` exchanges live and shadow weights (twice swaps back).
    """

    @dataclass(kw_only=True)
    class Config:
        module: str = "student"
        decay: float = 0.999
        warmup: bool = True
        """Use ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by the initial weights."""
        use_at_phase_end: bool = True
        """Hand the averaged weights on when a phase ends (else the average is only kept while training)."""
        start: int = 0
        """Iterations of each phase before averaging starts; until then the shadow is a copy of the weights."""
        kinds: list[str] | None = None
        """Only phases of these kinds (e.g. [adversarial]); None: every phase that trains the module."""

    def __init__(self, config: Config, *, out_dir: Any = None) -> None:
        self.config = config
        self.shadow: dict[str, Tensor] = {}
        self.updates = 0

    def _applies(self, phase: Any) -> bool:
        kinds = self.config.kinds
        return self.config.module in phase.optimizers and (kinds is None or phase.kind in kinds)

    def _params(self, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
        module = modules.get(self.config.module)
        if module is None:
            return {}
        return {n: p for n, p in module.named_parameters() if p.requires_grad or n in self.shadow}

    def on_phase_start(self, *, modules: dict[str, nn.Module], phase: Any = None, **_: Any) -> None:
        if phase is not None and not self._applies(phase):
            self.shadow = {}
            return
        if not self.shadow:  # not restored from a checkpoint
            self.shadow = {n: _local(p.detach()).clone().float() for n, p in self._params(modules).items()}
            self.updates = 0

    @torch.no_grad()
    def on_step_end(self, *, modules: dict[str, nn.Module], phase: Any = None, step: int | None = None, **_: Any) -> None:
        if not self.shadow:  # a phase this average does not apply to
            return
        if phase is not None and step is not None and step - phase.start <= self.config.start:
            for name, p in self._params(modules).items():  # before the start: follow the weights
                self.shadow[name].copy_(_local(p.detach()).float())
            return
        self.updates += 1
        n = self.updates
        decay = min(self.config.decay, (1 + n) / (10 + n)) if self.config.warmup else self.config.decay
        for name, p in self._params(modules).items():
            self.shadow[name].lerp_(_local(p.detach()).float(), 1 - decay)

    def on_phase_result(self, *, modules: dict[str, nn.Module], **_: Any) -> None:
        if self.config.use_at_phase_end and self.shadow:
            self.swap(modules)

    def on_phase_end(self, **_: Any) -> None:
        self.shadow = {}

    @torch.no_grad()
    def swap(self, modules: dict[str, nn.Module]) -> None:
        for name, p in self._params(modules).items():
            local = _local(p.detach())
            tmp = local.clone()
            local.copy_(self.shadow[name].to(local.dtype))
            self.shadow[name] = tmp.float()

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = state["shadow"]
        self.updates = state["updates"]
