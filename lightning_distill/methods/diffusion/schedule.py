"""The ``single`` schedule: one phase of plain training (no stages)."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_distill.config.fields import NonNegativeFloat, PositiveInt
from lightning_distill.config.registry import SCHEDULES
from lightning_distill.methods.base import OptimizerSettings, Phase, chain_phases


@SCHEDULES.register("single")
class Single:
    """One phase of ``steps`` optimizer steps (plain training, no stages)."""

    @dataclass(kw_only=True)
    class Config:
        steps: PositiveInt
        lr: NonNegativeFloat = 1e-4
        betas: tuple[float, float] = (0.9, 0.999)
        weight_decay: NonNegativeFloat = 0.0
        kind: str = "diffusion"
        module: str = "model"
        """The name of the trained module (its optimizer is named after it)."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def phases(self) -> list[Phase]:
        c = self.config
        settings = OptimizerSettings(c.lr, c.betas, c.weight_decay)
        return chain_phases([(c.kind, c.kind, c.kind, c.steps, {c.module: settings}, None)])
