"""The contract between the generic loop and a training method.

The loop knows phases, optimizers and modules by name; the method owns the maths. A phase is a contiguous
run of steps with one set of modules and optimizers; each optimizer is named after the module it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    every: int = 1
    """This optimizer steps on iterations where ``(step - phase.start) % every == 0``."""


@dataclass(frozen=True)
class Phase:
    """One phase of a schedule: which stage, what kind of step, how long, which optimizers step when.

    ``optimizers`` is ordered: on an iteration where several step, they step in this order (e.g. the
    discriminator before the generator).
    """

    index: int
    name: str
    stage: str
    kind: str
    start: int
    steps: int
    optimizers: dict[str, OptimizerSettings]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + self.steps

    def optimizers_at(self, step: int) -> list[str]:
        """Names of the optimizers that step at global ``step`` (which must lie in this phase)."""
        if not self.start <= step < self.end:
            raise ValueError(f"step {step} is outside phase {self.name} [{self.start}, {self.end})")
        return [n for n, s in self.optimizers.items() if (step - self.start) % s.every == 0]


def chain_phases(specs: list[tuple[str, str, str, int, dict[str, OptimizerSettings], dict[str, Any]]]) -> list[Phase]:
    """Number phases and lay them end to end: ``(name, stage, kind, steps, optimizers, options)`` each."""
    phases, start = [], 0
    for index, (name, stage, kind, steps, optimizers, options) in enumerate(specs):
        phases.append(Phase(index, name, stage, kind, start, steps, optimizers, options))
        start += steps
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase that global ``step`` falls in."""
    for phase in phases:
        if phase.start <= step < phase.end:
            return phase
    raise ValueError(f"step {step} is past the schedule's end ({phases[-1].end if phases else 0})")


ArtifactLoader = Callable[[int], dict[str, Tensor]]
"""Returns the artifact (a flat state dict) a finished phase left, by phase index."""


class Method:
    """Base class of training methods. Subclasses register in ``METHODS`` and implement the four calls below."""

    def build_phase(self, phase: Phase, artifacts: ArtifactLoader, empty: bool = False) -> dict[str, nn.Module]:
        """Fresh, unsharded modules for ``phase`` by name. Those named in ``phase.optimizers`` are trained; the
        others are frozen. ``artifacts(i)`` loads what phase ``i`` left (its students, for instance). With
        ``empty``, build the same modules on the meta device and load no weights (they arrive from rank 0)."""
        raise NotImplementedError

    def attach(self, modules: dict[str, nn.Module]) -> None:
        """Receive the modules after the strategy set them up (wrapped, sharded, on device)."""
        self.modules = modules

    def prepare(self, batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Per micro-batch work shared by every optimizer of iteration ``step`` (encoding, noise, teacher targets)."""
        return batch

    def training_step(self, batch: dict[str, Tensor], optimizer: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise for ``optimizer`` on a prepared micro-batch, and tensors to log."""
        raise NotImplementedError

    def artifact(self) -> dict[str, dict[str, Tensor]]:
        """Full state dicts a finished phase hands to later ones (every rank calls this; gather sharded weights
        with :func:`lightning_distill.checkpoint.full_state_dict`). Saved as safetensors, keys ``NAME.KEY``."""
        return {}

    @torch.no_grad()
    def preview(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Images ``[N, 3, H, W]`` in ``[0, 1]`` for sample grids, or None."""
        return None
