"""Progressive adversarial diffusion distillation (SDXL-Lightning): the method that owns the step.

Each stage's student learns to jump, in one solver step from ``x_t`` to ``x_{t-ns}``, where its frozen teacher
takes several. A phase regresses the teacher's result (``mse``), plays a GAN against a discriminator that sees
``x_{t-ns}`` and, when conditional, ``x_t`` (``adversarial``), or converts a copied epsilon network to x0 output
(``x0_convert``). A stage's final student (its LoRA merged) is the next stage's teacher.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from lightning_distill.engine.artifacts import full_state_dict
from lightning_distill.config.fields import Min, component
from lightning_distill.errors import UserError
from lightning_distill.methods.base import ArtifactLoader, Method, Phase, PhaseFacts, PhaseModel
from lightning_distill.methods.lightning.ladder import LadderOptions
from lightning_distill.models.noise import NoiseSchedule, snr_matched_timesteps
from lightning_distill.models.losses import chance_loss
from lightning_distill.models.regularizers import discriminator_step_index, regularizer_due
from lightning_distill.utils.images import to_unit
from lightning_distill.utils.tensors import strip_prefix
from lightning_distill.config.registry import LOSSES, METHODS
from lightning_distill.codecs.base import batch_conditioning, batch_latents, null_conditioning
from lightning_distill.models.adapters import LoRA

log = logging.getLogger(__name__)

def teacher_paths(
    index: Tensor, train_timesteps: int, jump: int, teacher_steps: int, T: int = 1000, pad_to: int = 0
) -> Tensor:
    """Per sample, the teacher's timesteps from the student's ``t`` to its target ``t - ns``.

    The student's ``t`` is point ``index`` of a trailing grid of ``train_timesteps``; its target lies ``jump``
    grid points later (``-1``, clean, past the end). The teacher walks there in steps of ``T / teacher_steps``.
    Positions are fractions of the trajectory, so grids of different sizes line up exactly (trailing spacing:
    ``t = round(T (1 - f)) - 1``). Shorter paths are padded at the front by repeating ``t`` (a step from ``t``
    to ``t`` changes nothing), giving a ``[B, n + 1]`` tensor, with ``n`` at least ``pad_to``.
    """
    f = index.double() / train_timesteps
    f_end = torch.clamp(f + jump / train_timesteps, max=1.0)
    n = torch.ceil((f_end - f) * teacher_steps - 1e-9).long()
    n_max = max(int(n.max()), pad_to)
    j = torch.arange(n_max + 1, device=index.device)[None, :] - (n_max - n)[:, None]  # front padding: j < 0
    frac = torch.minimum(f[:, None] + j.clamp(min=0).double() / teacher_steps, f_end[:, None])
    t = torch.round(T * (1 - frac)).long() - 1
    return torch.where(frac >= 1 - 1e-9, torch.full_like(t, -1), t)


@dataclass(kw_only=True)
class StudentEMA:
    """``method.ema``: an exponential moving average of the student's weights."""

    decay: float = 0.999
    start: Annotated[int, Min(0)] = 0
    """Iterations of each phase before averaging starts (until then the average follows the weights)."""
    warmup: bool = True
    """Use ``min(decay, (1 + n) / (10 + n))`` over the n-th update, so early averages forget the start quickly."""
    kinds: list[str] = field(default_factory=lambda: ["adversarial"])
    """The phase kinds averaged (mse, adversarial, x0_convert)."""


def _lowest_level_accuracy(real: Tensor, fake: Tensor, batch: dict, lowest: int) -> dict[str, Tensor]:
    """D accuracy over the pairs re-noised to the phase's lowest level (where the fine detail a student lacks shows)
    and their share of the batch. The report pools the accuracy over a window weighted by the share; a batch with
    no such pair logs accuracy 0 at share 0, which the pooling ignores."""
    at = (batch["renoise"] & (batch["t_disc"] == lowest)).float()
    correct = (((real > 0).float() + (fake < 0).float()) / 2).reshape(len(at), -1).mean(1)  # per pair, any logit shape
    return {"d/accuracy_lowest": (correct * at).sum() / at.sum().clamp(min=1), "d/lowest_share": at.mean()}


def _warn_x0_conversion(config: Any, phases: list[Phase]) -> None:
    """An ``x0_convert`` phase makes the epsilon teacher's x0 at t = T, ``(x - √(1-ᾱ_T) ε) / √ᾱ_T``: on linear
    betas √ᾱ_T is 0.0064 (SDXL's scaled-linear: 0.068), so the target amplifies the teacher's error by 150x. Said
    before anything loads, from the folder's (or the recipe's) schedule, where it can be read."""
    if not any(p.kind == "x0_convert" for p in phases):
        return
    teacher = getattr(config.teacher, "config", None)
    try:
        spec = getattr(teacher, "noise_schedule", None)
        if spec is not None:
            schedule = spec.build()
        else:
            from lightning_distill.models.architectures import offline_configs
            from lightning_distill.models.noise import schedule_from_pretrained

            with offline_configs():
                found = schedule_from_pretrained(getattr(teacher, "pretrained", ""))
            schedule = found[0] if found else None
        scale = float(schedule.alphas_cumprod[-1].sqrt()) if hasattr(schedule, "alphas_cumprod") else None
    except Exception:  # noqa: BLE001 - a warning must never stop a run; the teacher's own loading says what fails
        return
    if scale is not None and scale < 0.03:
        log.warning("x0_convert: the epsilon teacher's x0 at t = T divides by sqrt(alpha_bar_T) = %.4f on this "
                    "schedule (SDXL's betas: 0.068), amplifying its error %.0fx: expect a noisy 1-step target; a "
                    "v-prediction teacher needs no conversion (v is defined at t = T)", scale, 1 / scale)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


@METHODS.register("distill")
class ProgressiveDistillation(Method):
    log_weights = {"d/accuracy_lowest": "d/lowest_share"}

    @dataclass(kw_only=True)
    class Config:
        teacher: component("teacher")  # type: ignore[valid-type]
        student: component("student") = field(default_factory=lambda: {"name": "copy"})  # type: ignore[valid-type]
        discriminator: component("discriminator") | None = None  # type: ignore[valid-type]
        """Required when the schedule has adversarial phases."""
        regression_loss: component("loss") = field(default_factory=lambda: {"name": "mse"})  # type: ignore[valid-type]
        adversarial_loss: component("loss") = field(default_factory=lambda: {"name": "ns_gan"})  # type: ignore[valid-type]
        pure_noise_at_T: bool = True
        """Train on pure noise at t = T (SDXL's schedule never reaches it; sampling starts there)."""
        preview_size: int = 4
        """Samples in each preview grid."""
        keep_discriminator: bool = True
        """The discriminator carries over between the adversarial phases of a stage (its backbone always, its head
        when the conditioning stays the same) and is re-initialised at each stage, as in the paper. False: a
        fresh discriminator in every phase."""
        regularizers: list[component("regularizer")] = field(default_factory=list)  # type: ignore[valid-type]
        """Discriminator regularisers applied in its steps, e.g. ``[{name: r1, weight: 1.0, every: 4}]``: r1, r2
        (gradient penalties on real and fake inputs), approx_r1 (no double backward). Empty: none, as in the paper."""
        ema: StudentEMA | None = None
        """Average the student's weights in the phases it trains (of the kinds listed); the average is what the phase
        hands on (next phase, next stage's teacher), what is exported and what the report evaluates. None: off."""
        timestep_reference: Literal["teacher", "sdxl"] = "teacher"
        """What the recipe's ``renoise_timesteps`` mean. teacher: timesteps of the teacher's own schedule. sdxl:
        SDXL's timesteps (scaled-linear betas), mapped to the teacher's timesteps of the same signal-to-noise
        ratio, so that the paper's values mean the same noise level on any schedule."""

    def __init__(self, config: Config, *, phases: list[Phase], codec: nn.Module, seed: int = 0) -> None:
        self.config = config
        self.phases = phases
        self.codec = codec
        self.seed = seed
        self.regression = config.regression_loss.build()
        self._objectives(None)

    def _objectives(self, options: Any) -> None:
        """The adversarial loss and discriminator regularisers: a phase's own (``options``), else the method's."""
        c = self.config
        loss = getattr(options, "adversarial_loss", None) or c.adversarial_loss
        regularizers = getattr(options, "regularizers", None)
        self.adversarial = loss.build()
        self._chance = chance_loss(self.adversarial) if getattr(self.adversarial, "adversarial", False) else None
        self.regularizers = [(spec.name, spec.build()) for spec in (c.regularizers if regularizers is None else regularizers)]

    @staticmethod
    def callbacks(config: Config) -> list[Any]:
        """Callbacks the method's options need (the student's EMA), added to the recipe's own."""
        if config.ema is None:
            return []
        from lightning_distill.callbacks.ema import EMA

        e = config.ema
        return [EMA(EMA.Config(module="student", decay=e.decay, warmup=e.warmup, start=e.start, kinds=list(e.kinds)))]

    @staticmethod
    def check(config: Config, phases: list[Phase]) -> None:
        """Cross-checks of the recipe, before anything loads."""
        if config.discriminator is None and any(p.kind == "adversarial" for p in phases):
            raise UserError("method.discriminator: the schedule has adversarial phases; add a discriminator section")

        def adversarial(loss: object) -> bool:  # the loss contract: adversarial losses set adversarial = True
            return bool(getattr(loss, "adversarial", False))

        _warn_x0_conversion(config, phases)
        chosen = [("method.adversarial_loss", config.adversarial_loss)] + [
            (f"schedule: phase {p.name!r} adversarial_loss", p.options.adversarial_loss)
            for p in phases if getattr(p.options, "adversarial_loss", None) is not None]
        for where, spec in chosen:
            if not adversarial(LOSSES.get(spec.name)):
                names = ", ".join(n for n, loss in LOSSES.items() if adversarial(loss))
                raise UserError(f"{where}: {spec.name!r} is not an adversarial loss; choose one of {names}")

    # -- phases -------------------------------------------------------------------------------------------
    def _last_phase_of(self, stage: str) -> Phase:
        return [p for p in self.phases if p.stage == stage][-1]

    def build_phase(self, phase: Phase, artifacts: ArtifactLoader, empty: bool = False) -> dict[str, nn.Module]:
        if empty:
            with torch.device("meta"):
                return self._build(phase, artifacts, empty=True)
        return self._build(phase, artifacts, empty=False)

    def _build(self, phase: Phase, artifacts: ArtifactLoader, empty: bool) -> dict[str, nn.Module]:
        c = self.config
        self.phase = phase
        stages = list(dict.fromkeys(p.stage for p in self.phases))
        before = stages[: stages.index(phase.stage)]
        source = phase.options.teacher_from or (before[-1] if before else None)
        teacher = c.teacher.build(seed=self.seed, empty=empty) if empty else c.teacher.build(seed=self.seed)
        teacher.null_keeps = tuple(getattr(self.codec, "null_keeps", ("time_ids",)))  # what guidance leaves as is
        if source is not None:  # this stage's teacher: a previous stage's final (merged) student
            last = self._last_phase_of(source)
            if not empty:
                teacher.denoiser.load_state_dict(strip_prefix(artifacts(last.index), "student.net."))
            teacher.prediction = last.options.prediction or c.student.config.prediction or teacher.prediction
        earlier = [p for p in self.phases if p.end <= phase.start]
        student = c.student.build(teacher=teacher, prediction=phase.options.prediction)
        start = phase.options.student_from
        if start is None and earlier:  # continue from the last phase's student (it may differ from the teacher)
            start = earlier[-1].index
        if start is not None and not empty:  # (or, first in a branch, from the branch point's student)
            student.load_state_dict(strip_prefix(artifacts(start), "student."))
        o = phase.options
        self._objectives(o)
        adapter = phase.options.adapter.build()
        adapter.apply(student.net)
        self.adapter = adapter
        modules: dict[str, nn.Module] = {"teacher": teacher, "student": student}
        if phase.kind == "adversarial":
            disc = c.discriminator.build(teacher=teacher, conditional=phase.options.conditional)
            kept = self._kept_discriminator(phase)
            state = strip_prefix(artifacts(kept.index), "discriminator.") if kept is not None and not empty else {}
            if kept is not None and not empty and not state:
                log.warning("phase %s left no discriminator to keep (a run folder of an older version?); "
                            "%s starts with a fresh one", kept.name, phase.name)
            if state:  # the stage's discriminator so far (a new head if the conditioning changed)
                heads = tuple(getattr(disc, "head_prefixes", ("head.",)))  # what depends on the conditioning
                if kept.options.conditional != phase.options.conditional:
                    state = {k: v for k, v in state.items() if not k.startswith(heads)}
                missing, unexpected = disc.load_state_dict(state, strict=False)
                if unexpected or any(not k.startswith(heads) for k in missing):  # only a new head may be missing
                    raise RuntimeError(f"discriminator of {kept.name} does not fit {phase.name}: "
                                       f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            modules["discriminator"] = disc
        return modules

    def _kept_discriminator(self, phase: Phase) -> Phase | None:
        """The adversarial phase of the same stage, just before ``phase``, whose discriminator carries over."""
        if not self.config.keep_discriminator:
            return None
        earlier = [p for p in self.phases if p.stage == phase.stage and p.end <= phase.start]
        return earlier[-1] if earlier and earlier[-1].kind == "adversarial" else None

    def _renoise_levels(self, like: Tensor) -> tuple[int, ...]:
        """The phase's re-noise timesteps on the teacher's schedule (mapped by SNR from SDXL's, if so set; ``like``:
        the latents, for a resolution-dependent schedule); mapped once per phase and size, not every iteration."""
        levels = self.phase.options.renoise_timesteps
        if self.config.timestep_reference != "sdxl" or not levels:
            return tuple(levels)
        key = (self.phase.index, levels, tuple(like.shape[-2:]))
        cached = getattr(self, "_mapped_levels", None)
        if cached is None or cached[0] != key:
            schedule = self.modules["teacher"].schedule
            mapped = tuple(snr_matched_timesteps(list(levels), NoiseSchedule(), schedule, like))
            self._mapped_levels = cached = (key, mapped)
        return cached[1]

    def artifact(self) -> dict[str, dict[str, Tensor]]:
        """The student with its adapter merged: plain weights the next phase and stage load; and the
        discriminator, when a later phase of the stage keeps it."""
        out = {"student": self.adapter.merge_state(full_state_dict(self.modules["student"]))}
        later = [p for p in self.phases if p.start == self.phase.end]
        kept = self._kept_discriminator(later[0]) if later else None
        if "discriminator" in self.modules and kept is not None and kept.index == self.phase.index:
            out["discriminator"] = full_state_dict(self.modules["discriminator"])
        return out

    # -- steps --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, batch: dict, step: int) -> dict:
        o: LadderOptions = self.phase.options
        latents = batch_latents(batch, self.codec)
        cond = batch_conditioning(batch, self.codec)
        teacher = self.modules["teacher"]
        B, device = latents.shape[0], latents.device
        # timesteps are drawn on the CPU (tiny, and no device sync for the path length)
        index = torch.randint(0, o.train_timesteps, (B,), device="cpu")
        if self.phase.kind == "x0_convert":
            path = teacher_paths(index, o.train_timesteps, 0, 1, teacher.schedule.T)  # [t, t]
        else:
            jump = o.train_timesteps // o.student_steps
            # sharded, every rank must run the teacher's blocks equally often: paths padded to the longest possible
            pad = math.ceil(jump * o.teacher_steps / o.train_timesteps) if _distributed() else 0
            path = teacher_paths(index, o.train_timesteps, jump, o.teacher_steps, teacher.schedule.T, pad)
        path = path.to(device)
        t, t_prev = path[:, -1 if self.phase.kind == "x0_convert" else 0], path[:, -1]
        noise = torch.randn_like(latents)
        x_t = teacher.schedule.add_noise(latents, noise, t, pure_noise_at_T=self.config.pure_noise_at_T)
        if self.phase.kind == "x0_convert":
            # the x0 the original (epsilon) network implies at x_t: what the x0-parameterised copy must output.
            # One solver step to t = -1 (ᾱ = 1) is exactly that x0, and goes through forward (FSDP2 hooks it).
            target = teacher(x_t, torch.stack([t, torch.full_like(t, -1)], dim=1), cond, 0.0)
        else:
            target = teacher(x_t, path, cond, o.guidance, self._null(latents) if o.guidance > 1 else None)
        prepared = {"x_t": x_t, "t": t, "t_prev": t_prev, "target": target, "cond": cond}
        if "discriminator" in self.phase.optimizers:  # the discriminator's own step count, for lazy regularisers
            prepared["disc_step"] = discriminator_step_index(self.phase, step)
        if o.renoises and self.phase.kind == "adversarial":
            prepared.update(self._renoise_plan(t_prev, latents, step))
        return prepared

    def _null(self, latents: Tensor) -> dict[str, Tensor] | None:
        """Guidance's unconditional input for the codec (None: zeros), encoded once per image size."""
        if getattr(self.codec, "zero_null", True):
            return None
        f = self.codec.scale_factor
        key = (tuple(latents.shape[-2:]), latents.device)
        cached = getattr(self, "_null_cache", None)
        if cached is None or cached[0] != key:
            h, w = (f * s for s in latents.shape[-2:])
            self._null_cache = cached = (key, null_conditioning(self.codec, h, w, latents.device))
        return cached[1]

    def _renoise_plan(self, t_prev: Tensor, like: Tensor, step: int) -> dict[str, Tensor]:
        """Where the target is clean, a timestep t* (weights moving linearly over the phase) and shared noise."""
        o: LadderOptions = self.phase.options
        if o.renoise_distribution == "logit_normal":
            t_star = self._logit_normal_levels(like)
            return {"t_disc": torch.where(t_prev < 0, t_star, t_prev), "renoise": t_prev < 0,
                    "d_noise": torch.randn_like(like)}
        progress = (step - self.phase.start) / max(1, self.phase.steps - 1)
        w0, w1 = torch.tensor(o.renoise_weights, device="cpu"), torch.tensor(o.renoise_weights_end, device="cpu")
        weights = (1 - progress) * w0 + progress * w1
        pick = torch.multinomial(weights.double(), like.shape[0], replacement=True).to(like.device)  # on the CPU
        t_star = torch.tensor(self._renoise_levels(like), device=like.device)[pick]
        return {"t_disc": torch.where(t_prev < 0, t_star, t_prev), "renoise": t_prev < 0, "d_noise": torch.randn_like(like)}

    def _logit_normal_levels(self, like: Tensor) -> Tensor:
        """Per sample, the teacher's timestep nearest in log-SNR to a flow σ drawn logit-normal (LADD)."""
        o: LadderOptions = self.phase.options
        key = (self.phase.index, tuple(like.shape[-2:]))
        cached = getattr(self, "_snr_grid", None)
        if cached is None or cached[0] != key:
            schedule = self.modules["teacher"].schedule
            self._snr_grid = cached = (key, schedule.log_snr(torch.arange(schedule.T), like).double().cpu())
        logit = o.renoise_mean + o.renoise_scale * torch.randn(like.shape[0], device="cpu", dtype=torch.float64)
        wanted = -2 * logit  # log((1 - σ)² / σ²) for σ = sigmoid(logit)
        return (cached[1][None, :] - wanted[:, None]).abs().argmin(dim=1).to(like.device)

    def _student_step(self, b: dict) -> Tensor:
        x0, eps = self.modules["student"](b["x_t"], b["t"], b["cond"])
        if self.phase.kind == "x0_convert":
            return x0
        return self.modules["teacher"].schedule.step(x0, eps, b["t_prev"])

    def _judged(self, x_prev: Tensor, b: dict) -> tuple[Tensor, Tensor]:
        """What the discriminator sees of ``x_{t-ns}``: re-noised to t* where it is clean (the same noise for real
        and fake), and at which timestep."""
        t_prev = b["t_prev"]
        if "t_disc" in b:
            schedule = self.modules["teacher"].schedule
            noised = schedule.add_noise(x_prev, b["d_noise"], b["t_disc"].clamp(min=0))
            x_prev = torch.where(b["renoise"].reshape(-1, *[1] * (x_prev.ndim - 1)), noised, x_prev)
            t_prev = b["t_disc"]
        return x_prev, t_prev

    def _discriminate(self, x_prev: Tensor, b: dict) -> Tensor:
        x, t_prev = self._judged(x_prev, b)
        return self.modules["discriminator"](x, t_prev, b["cond"], b["x_t"], b["t"])

    def training_step(self, batch: dict, optimizer: str) -> tuple[Tensor, dict[str, Tensor]]:
        if self.phase.kind in ("mse", "x0_convert"):
            loss = self.regression(self._student_step(batch), batch["target"])
            return loss, {f"loss/{self.phase.kind}": loss.detach()}
        if optimizer == "discriminator":
            return self._discriminator_step(batch)
        fake = self._student_step(batch)
        real_logits = None
        if self.adversarial.relativistic:  # paired with the same sample's real logit (no gradient to the student)
            with torch.no_grad():
                real_logits = self._discriminate(batch["target"], batch)
        loss = self.adversarial.generator_loss(self._discriminate(fake, batch), real_logits)
        logs = {"loss/generator": loss.detach()}
        weight = self.phase.options.regression_weight
        if weight:  # an anchor to the teacher's step beside the adversarial loss (ADD's distillation term)
            gap = self.regression(fake, batch["target"])
            loss = loss + weight * gap
            gap = gap.detach()
        else:
            with torch.no_grad():
                gap = self.regression(fake, batch["target"])
        return loss, {**logs, "mse_to_teacher": gap}

    def _discriminator_step(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            fake = self._student_step(batch)
        real, t_prev = self._judged(batch["target"], batch)
        fake, _ = self._judged(fake, batch)
        disc = self.modules["discriminator"]

        def d(x: Tensor) -> Tensor:
            return disc(x, t_prev, batch["cond"], batch["x_t"], batch["t"])

        real_logits, fake_logits = d(real), d(fake)
        loss = adversarial = self.adversarial.discriminator_loss(real_logits, fake_logits)
        logs = {
            "loss/discriminator": adversarial.detach(),
            "d/p_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d/p_fake": torch.sigmoid(fake_logits.detach().float()).mean(),
            # how often D labels them right by sign: 0.5 is chance (also where every pair shares a sign), 1 a perfect one
            "d/accuracy": ((real_logits.detach() > 0).float().mean() + (fake_logits.detach() < 0).float().mean()) / 2,
            # how often the teacher's sample scores above the student's made from the same x_t: the ranking, which a
            # relativistic loss learns (it leaves the logits' offset free, so d/accuracy can sit at 0.5 beside it)
            "d/pair_accuracy": (real_logits.detach() > fake_logits.detach()).float().mean(),
            # why the two can disagree: the mean gap between a pair's logits (what ranks them) against the spread
            # over the batch of what a pair's logits share (an offset per x_t, which thresholding at 0 sees)
            "d/margin": (real_logits.detach() - fake_logits.detach()).float().mean(),
            "d/shared_spread": ((real_logits.detach() + fake_logits.detach()).float() / 2).std(correction=0),
        }
        if self._chance:  # the loss over its value at chance: 1 has learnt nothing (accuracy can say otherwise)
            logs["d/loss_ratio"] = adversarial.detach().float() / self._chance
        if "t_disc" in batch and self.phase.options.renoise_distribution == "discrete":
            logs.update(_lowest_level_accuracy(real_logits.detach(), fake_logits.detach(), batch,
                                               min(self._renoise_levels(real))))
        for name, reg in self.regularizers:
            every = reg.config.every
            if reg.config.weight and regularizer_due(batch.get("disc_step", 0), every):
                value = reg(d, real, fake, real_logits, fake_logits)
                loss = loss + reg.config.weight * every * value
                logs[f"reg/{name}"] = value.detach().float()
        return loss, logs

    # -- what a finished phase is ----------------------------------------------------------------------------
    def facts(self, phase: Phase) -> PhaseFacts:
        student = self.modules["student"]
        return PhaseFacts(phase.stage, phase.kind, student.prediction, phase.options.student_steps)

    def phase_model(self, facts: PhaseFacts | None, artifact: dict[str, Tensor] | None) -> PhaseModel:
        """The teacher network with the phase's student weights (or, with no facts, the base teacher)."""
        teacher = self.config.teacher.build(seed=self.seed)
        prediction = teacher.prediction
        if facts is not None and artifact is not None:
            teacher.denoiser.load_state_dict(strip_prefix(artifact, "student.net."))
            prediction = facts.prediction
        else:
            facts = PhaseFacts("teacher", "base", prediction)
        rules = {tuple(p.options.adapter.build().exclusions(teacher.denoiser))
                 for p in self.phases if p.options.adapter.name == "lora"}
        if not rules:  # a full-weights run: a LoRA export targets the network's own rule
            rules = {tuple(LoRA(LoRA.Config()).exclusions(teacher.denoiser))}
        exclude = set.intersection(*(set(r) for r in rules))  # several rules: every layer any of them trained

        def base_network() -> nn.Module:  # rounded through the teacher's dtype, as the student's start was
            return self.config.teacher.build(seed=self.seed).denoiser.network.float()

        return PhaseModel(
            facts=PhaseFacts(facts.stage, facts.kind, prediction, facts.steps),
            denoiser=teacher.denoiser,
            schedule=teacher.schedule,
            latent_channels=teacher.denoiser.in_channels,
            network=teacher.denoiser.network,
            scheduler=(lambda: teacher.sampling_scheduler(prediction)) if teacher.source is not None else None,
            base=teacher.source.pretrained if teacher.source is not None else None,
            base_network=base_network,
            lora_exclude=sorted(exclude),
            pipeline=teacher.pipeline_class,
            network_folder=teacher.network_folder,
            embedded_guidance=teacher.embedded_guidance,
            pipeline_call=dict(getattr(teacher, "pipeline_call", {})),
        )

    def _current_model(self) -> PhaseModel:
        """The student being trained, as a phase model. It is called through its root module (FSDP2's hooks live
        there), and its ``(x0, ε)`` turned back into its raw prediction for the sampler."""
        teacher, student = self.modules["teacher"], self.modules["student"]
        schedule = teacher.schedule

        def denoiser(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
            return schedule.target(*student(x, t, cond), t, student.prediction)

        facts = PhaseFacts(self.phase.stage, self.phase.kind, student.prediction, self.phase.options.student_steps)
        return PhaseModel(facts, denoiser, schedule, teacher.denoiser.in_channels)  # type: ignore[arg-type]

    @torch.no_grad()
    def preview(self, batch: dict) -> Tensor:
        """The student's samples in ``student_steps`` steps from fixed noise, through the one sampler (first three
        latent channels, or decoded pixels when the codec has a VAE)."""
        latents = batch_latents(batch, self.codec)
        n = min(self.config.preview_size, latents.shape[0])
        cond = {k: v[:n] for k, v in batch_conditioning(batch, self.codec).items()}
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(latents[:n].shape, generator=g).to(latents)
        return to_unit(self.codec.decode(self._current_model().sample(noise, cond)))
