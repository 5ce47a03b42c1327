"""The progressive stage ladder: a pure description of every phase, queryable without a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from lightning_distill.config.fields import Min, NonNegativeFloat, PositiveInt, Spec, component
from lightning_distill.config.registry import SCHEDULES
from lightning_distill.errors import UserError
from lightning_distill.methods.base import OptimizerSettings, Phase, chain_phases
from lightning_distill.models.noise import Prediction


@dataclass(frozen=True)
class LadderOptions:
    """What the ladder decided for one phase, and the distillation method reads (``Phase.options``)."""

    teacher_steps: int
    """Steps of the teacher's sampler over the whole trajectory."""
    student_steps: int
    train_timesteps: int
    """The student's training timesteps: a trailing grid of this many."""
    prediction: Prediction | None
    """The student's parameterisation (None: the student's or the teacher's)."""
    conditional: bool
    guidance: float
    adapter: Spec
    teacher_from: str | None
    """The stage whose final student is the teacher (None: the previous stage)."""
    student_from: int | None
    """The phase whose student this phase starts from (None: the previous phase)."""
    renoise_timesteps: tuple[int, ...] = ()
    renoise_weights: tuple[float, ...] = ()
    renoise_weights_end: tuple[float, ...] = ()
    renoise_distribution: str = "discrete"
    renoise_mean: float = 0.0
    renoise_scale: float = 1.0
    adversarial_loss: Spec | None = None
    """The phase's adversarial loss (None: the method's)."""
    regularizers: tuple[Spec, ...] | None = None
    """The phase's discriminator regularisers (None: the method's)."""
    regression_weight: float = 0.0
    """adversarial: weight of the regression to the teacher's step added to the student's loss."""

    @property
    def renoises(self) -> bool:
        """Whether clean targets are re-noised before the discriminator."""
        return bool(self.renoise_timesteps) or self.renoise_distribution == "logit_normal"


@dataclass(kw_only=True)
class PhaseConfig:
    """One phase of a stage."""

    kind: Literal["mse", "adversarial", "x0_convert"]
    """mse: regress the teacher's x_{t-ns}. adversarial: GAN against the discriminator. x0_convert: regress the
    x0 the teacher implies at x_t (switches a copied epsilon network to x0 output, for 1 step)."""
    steps: PositiveInt
    adapter: component("adapter") = field(default_factory=lambda: {"name": "full"})  # type: ignore[valid-type]
    """What of the student trains: full, or lora (merged into the weights when the phase ends)."""
    lr: NonNegativeFloat = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.0
    discriminator_lr: NonNegativeFloat | None = None
    """Defaults to ``lr``."""
    discriminator_betas: tuple[float, float] | None = None
    """Defaults to ``betas``."""
    discriminator_every: PositiveInt = 1
    """The discriminator steps every this many iterations."""
    student_every: PositiveInt = 1
    """adversarial: the student steps every this many iterations, so the discriminator takes several steps per
    student step (with ``discriminator_every: 1``)."""
    discriminator_warmup: Annotated[int, Min(0)] = 0
    """adversarial: iterations at the phase start in which only the discriminator trains, so that the student
    follows a discriminator that already tells teacher from student (scaled with the phase by steps_scale)."""
    conditional: bool = True
    """adversarial: the discriminator also sees x_t (conditional) or only x_{t-ns} (unconditional)."""
    guidance: float = 0.0
    """Teacher classifier-free guidance scale (0 or 1: none)."""
    teacher_from: str | None = None
    """Name of the stage whose final student is the teacher (skip-level teacher); default: the previous stage."""
    renoise_timesteps: list[Annotated[int, Min(0)]] = field(default_factory=list)
    """Where x_{t-ns} is clean (t-ns < 0), re-noise teacher and student samples to one of these t* before the
    discriminator (the paper: 10, 250, 500, 750). Empty: off."""
    renoise_weights: list[NonNegativeFloat] = field(default_factory=list)
    """Sampling weights of ``renoise_timesteps`` at the phase start (default uniform)."""
    renoise_weights_end: list[NonNegativeFloat] = field(default_factory=list)
    """Weights at the phase end, reached linearly (the paper: 5:1:1:1); default: unchanged."""
    renoise_distribution: Literal["discrete", "logit_normal"] = "discrete"
    """discrete: t* among ``renoise_timesteps`` with their weights (the paper). logit_normal: LADD's, a noise level
    with flow-matching σ = sigmoid(mean + scale·z), z ~ N(0, 1), taken on the teacher's schedule at the same
    signal-to-noise ratio (log-SNR = -2 (mean + scale·z)); a positive mean favours high noise."""
    renoise_mean: float = 0.0
    renoise_scale: NonNegativeFloat = 1.0
    adversarial_loss: component("loss") | None = None  # type: ignore[valid-type]
    """adversarial: this phase's objective instead of ``method.adversarial_loss`` (e.g. to compare objectives
    from one start in one recipe)."""
    regularizers: list[component("regularizer")] | None = None  # type: ignore[valid-type]
    """adversarial: this phase's discriminator regularisers instead of ``method.regularizers`` ([]: none)."""
    regression_weight: NonNegativeFloat = 0.0
    """adversarial: adds this weight times ``method.regression_loss`` between the student's and the teacher's
    x_{t-ns} to the student's adversarial loss (as ADD adds its distillation loss): an anchor that keeps the student
    on its teacher's trajectory while the discriminator sharpens it. 0: the paper's pure adversarial loss."""
    name: str | None = None
    """Defaults to ``{stage}-{kind}`` (``-cond``/``-uncond`` for adversarial, ``-lora`` for LoRA)."""


@dataclass(kw_only=True)
class StageConfig:
    """A student that jumps ``T / student_steps`` in one step where its teacher takes several."""

    name: str
    teacher_steps: PositiveInt | None = None
    """Steps of the teacher's sampler over the whole trajectory (its step size is T / teacher_steps). Required for
    the first stage (the base model's sampler); later stages default to their teacher stage's student_steps."""
    student_steps: PositiveInt
    train_timesteps: PositiveInt | None = None
    """Student training timesteps (a trailing grid of this many); default student_steps. The paper trains 1- and
    2-step students on 4 (t = 999, 749, 499, 249)."""
    prediction: Prediction | None = None
    """The student's parameterisation from this stage on; default: the previous stage's (or the student's)."""
    branch_from: str | None = None
    """Start from this earlier stage's final student (as the teacher and as the student's starting point) instead
    of the previous stage's: a second ladder branching off an earlier stage, e.g. an MSE-only baseline beside
    the adversarial one. Later stages follow this branch."""
    phases: list[PhaseConfig]


@SCHEDULES.register("ladder")
class Ladder:
    """Stages in order; each stage's final student is the next stage's teacher."""

    @dataclass(kw_only=True)
    class Config:
        stages: list[StageConfig] = field(default_factory=list)
        steps_scale: NonNegativeFloat = 1.0
        """Multiplies every phase's steps (at least 1 each): ``schedule.steps_scale=0.1`` is a quick trial run of
        the same ladder."""
        until: str | None = None
        """Train the stages up to this one (in the listed order) and leave out those after it: the first part of a
        ladder (``schedule.until=l4``), or a stage probe that must start where the recipe's own run did
        (``recipes/tiny/probes/stage_*.yaml``). None: every stage."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def stages(self) -> list[StageConfig]:
        """The stages trained: all of them, or those up to ``until``."""
        stages = list(self.config.stages)
        until = self.config.until
        if until is None:
            return stages
        names = [stage.name for stage in stages]
        if until not in names:
            raise UserError(f"schedule: until {until!r} is not a stage; choose one of {', '.join(names) or 'none'}")
        return stages[: names.index(until) + 1]

    def phases(self) -> list[Phase]:
        specs = []
        prediction: str | None = None
        seen: list[str] = []
        steps_of: dict[str, int] = {}
        prediction_of: dict[str, str | None] = {}
        last_phase_of: dict[str, int] = {}
        for stage in self.stages():
            where = f"schedule: stage {stage.name!r}"
            train = stage.train_timesteps or stage.student_steps
            branch = stage.branch_from
            if branch is not None and branch not in seen:
                raise UserError(f"{where}: branch_from {branch!r} is not an earlier stage ({', '.join(seen) or 'none'})")
            if branch is not None:
                prediction = prediction_of[branch]
            previous = branch or (seen[-1] if seen else None)
            teacher_steps = stage.teacher_steps or (steps_of[previous] if previous else None)
            if teacher_steps is None:
                raise UserError(f"{where}: the first stage needs teacher_steps (the base model's sampling steps)")
            if train % stage.student_steps:
                raise UserError(f"{where}: train_timesteps ({train}) must be a multiple of student_steps ({stage.student_steps})")
            if teacher_steps % stage.student_steps:
                raise UserError(
                    f"{where}: teacher_steps ({teacher_steps}) must be a multiple of student_steps ({stage.student_steps})"
                )
            prediction = stage.prediction or prediction
            if not stage.phases:
                raise UserError(f"{where}: a stage needs at least one phase")
            for i, p in enumerate(stage.phases):
                if p.renoise_distribution == "logit_normal" and p.renoise_timesteps:
                    raise UserError(f"{where}: renoise_timesteps apply to renoise_distribution: discrete; the "
                                    "logit_normal one draws its levels (renoise_mean, renoise_scale)")
                if any(t >= 1000 for t in p.renoise_timesteps):
                    raise UserError(f"{where}: renoise_timesteps must lie in [0, 1000), got {p.renoise_timesteps}")
                for w in (p.renoise_weights, p.renoise_weights_end):
                    if w and sum(w) <= 0:
                        raise UserError(f"{where}: renoise weights must have a positive sum, got {w}")
                if p.teacher_from is not None and p.teacher_from not in seen:
                    raise UserError(f"{where}: teacher_from {p.teacher_from!r} is not an earlier stage ({', '.join(seen) or 'none'})")
                if p.renoise_weights and len(p.renoise_weights) != len(p.renoise_timesteps):
                    raise UserError(f"{where}: renoise_weights needs one weight per renoise timestep")
                if p.renoise_weights_end and len(p.renoise_weights_end) != len(p.renoise_timesteps):
                    raise UserError(f"{where}: renoise_weights_end needs one weight per renoise timestep")
                adapter: Spec = p.adapter
                suffix = {"adversarial": "cond" if p.conditional else "uncond"}.get(p.kind, p.kind)
                if adapter.name != "full":
                    suffix += f"-{adapter.name}"
                student = OptimizerSettings(p.lr, p.betas, p.weight_decay)
                optimizers = {"student": student}
                if p.kind != "adversarial" and (p.discriminator_warmup or p.student_every > 1):
                    raise UserError(f"{where}: discriminator_warmup and student_every apply to adversarial phases only")
                if p.kind != "adversarial" and (p.adversarial_loss is not None or p.regularizers is not None
                                                or p.regression_weight):
                    raise UserError(f"{where}: adversarial_loss, regularizers and regression_weight apply to "
                                    "adversarial phases only")
                steps = max(1, round(p.steps * self.config.steps_scale))
                if p.kind == "adversarial":
                    warmup = round(p.discriminator_warmup * self.config.steps_scale)  # scaled with the phase
                    if warmup >= steps and p.discriminator_warmup:
                        raise UserError(f"{where}: discriminator_warmup ({p.discriminator_warmup}) leaves the "
                                        f"student no step of the phase's {p.steps}")
                    student = OptimizerSettings(p.lr, p.betas, p.weight_decay, every=p.student_every, after=warmup)
                    disc = OptimizerSettings(
                        p.discriminator_lr if p.discriminator_lr is not None else p.lr,
                        p.discriminator_betas or p.betas,
                        p.weight_decay,
                        every=p.discriminator_every,
                    )
                    optimizers = {"discriminator": disc, "student": student}
                n = len(p.renoise_timesteps)
                options = LadderOptions(
                    teacher_steps=steps_of[p.teacher_from] if p.teacher_from else teacher_steps,
                    student_steps=stage.student_steps,
                    train_timesteps=train,
                    prediction=prediction,  # type: ignore[arg-type]
                    conditional=p.conditional,
                    guidance=p.guidance,
                    adapter=adapter,
                    teacher_from=p.teacher_from or branch,
                    student_from=last_phase_of[branch] if branch and i == 0 else None,
                    renoise_timesteps=tuple(p.renoise_timesteps),
                    renoise_weights=tuple(p.renoise_weights or [1.0] * n),
                    renoise_weights_end=tuple(p.renoise_weights_end or p.renoise_weights or [1.0] * n),
                    renoise_distribution=p.renoise_distribution,
                    renoise_mean=p.renoise_mean,
                    renoise_scale=p.renoise_scale,
                    adversarial_loss=p.adversarial_loss,
                    regularizers=tuple(p.regularizers) if p.regularizers is not None else None,
                    regression_weight=p.regression_weight,
                )
                specs.append((p.name or f"{stage.name}-{suffix}", stage.name, p.kind, steps, optimizers, options))
            seen.append(stage.name)
            steps_of[stage.name] = stage.student_steps
            prediction_of[stage.name] = prediction
            last_phase_of[stage.name] = len(specs) - 1
        if not specs:
            raise UserError("schedule: the ladder has no phases; add stages with phases")
        names = [s[0] for s in specs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"schedule: phase names must be unique; repeated: {', '.join(dupes)}. Give phases a 'name'")
        return chain_phases(specs)
