"""The progressive stage ladder: a pure description of every phase, queryable without a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import UserError
from ..method import OptimizerSettings, Phase, chain_phases
from ..registry import SCHEDULES


@dataclass(kw_only=True)
class PhaseConfig:
    """One phase of a stage."""

    kind: Literal["mse", "adversarial"]
    """mse: regress the teacher's x_{t-ns}. adversarial: GAN with the discriminator."""
    steps: int
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    discriminator_lr: float | None = None
    """Defaults to ``lr``."""
    discriminator_betas: tuple[float, float] | None = None
    """Defaults to ``betas``."""
    conditional: bool = True
    """adversarial: the discriminator also sees x_t (conditional) or only x_{t-ns} (unconditional)."""
    guidance: float = 0.0
    """Teacher classifier-free guidance scale (0 or 1: none)."""
    name: str | None = None
    """Defaults to ``{stage}-{kind}`` (``-cond``/``-uncond`` for adversarial)."""


@dataclass(kw_only=True)
class StageConfig:
    """A student that takes one step where its teacher takes ``teacher_steps / student_steps``."""

    name: str
    teacher_steps: int
    student_steps: int
    phases: list[PhaseConfig]


@SCHEDULES.register("ladder")
class Ladder:
    """Stages in order; each stage's final student is the next stage's teacher."""

    @dataclass(kw_only=True)
    class Config:
        stages: list[StageConfig] = field(default_factory=list)

    def __init__(self, config: Config) -> None:
        self.config = config

    def phases(self) -> list[Phase]:
        specs = []
        for stage in self.config.stages:
            if stage.teacher_steps % stage.student_steps:
                raise UserError(
                    f"schedule: stage {stage.name!r}: teacher_steps ({stage.teacher_steps}) must be a multiple of "
                    f"student_steps ({stage.student_steps})"
                )
            for p in stage.phases:
                suffix = p.kind if p.kind != "adversarial" else ("cond" if p.conditional else "uncond")
                student = OptimizerSettings(p.lr, p.betas, p.weight_decay)
                if p.kind == "adversarial":
                    disc = OptimizerSettings(
                        p.discriminator_lr if p.discriminator_lr is not None else p.lr,
                        p.discriminator_betas or p.betas,
                        p.weight_decay,
                    )
                    optimizers = {"discriminator": disc, "student": student}
                else:
                    optimizers = {"student": student}
                options = {
                    "teacher_steps": stage.teacher_steps,
                    "student_steps": stage.student_steps,
                    "conditional": p.conditional,
                    "guidance": p.guidance,
                }
                specs.append((p.name or f"{stage.name}-{suffix}", stage.name, p.kind, p.steps, optimizers, options))
        if not specs:
            raise UserError("schedule: the ladder has no phases; add stages with phases")
        names = [s[0] for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"schedule: phase names must be unique; repeated: {', '.join(dupes)}")
        return chain_phases(specs)
