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

from lightning_distill.models.noise import NoiseSchedule, Prediction


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    every: int = 1
    """This optimizer steps on iterations where ``(step - phase.start - after) % every == 0``."""
    after: int = 0
    """It steps only from the ``after``-th iteration of its phase on (a discriminator warm-up holds the student
    back while the discriminator learns)."""


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
    options: Any = None
    """What the schedule decided for the phase, for its method (a frozen dataclass, e.g. ``LadderOptions``)."""

    @property
    def end(self) -> int:
        return self.start + self.steps

    def optimizers_at(self, step: int) -> list[str]:
        """Names of the optimizers that step at global ``step`` (which must lie in this phase)."""
        if not self.start <= step < self.end:
            raise ValueError(f"step {step} is outside phase {self.name} [{self.start}, {self.end})")
        i = step - self.start
        return [n for n, s in self.optimizers.items() if i >= s.after and (i - s.after) % s.every == 0]


def chain_phases(specs: list[tuple[str, str, str, int, dict[str, OptimizerSettings], Any]]) -> list[Phase]:
    """Number phases and lay them end to end: ``(name, stage, kind, steps, optimizers, options)`` each."""
    phases, start = [], 0
    for index, (name, stage, kind, steps, optimizers, options) in enumerate(specs):
        phases.append(Phase(index, name, stage, kind, start, steps, optimizers, options))
        start += steps
    return phases


ArtifactLoader = Callable[[int], dict[str, Tensor]]
"""Returns the artifact (a flat state dict) a finished phase left, by phase index."""


@dataclass(frozen=True)
class PhaseFacts:
    """What a finished phase made, as its method decided: recorded in the phase artifact's metadata and read
    back by ``sample``, ``export`` and the report, never re-derived."""

    stage: str
    kind: str
    prediction: Prediction
    """The parameterisation the phase's network predicts."""
    steps: int | None = None
    """The sampling steps it was trained for (None: any, e.g. a base model)."""

    def to_metadata(self) -> dict[str, str]:
        return {"stage": self.stage, "kind": self.kind, "prediction": self.prediction,
                "steps": "" if self.steps is None else str(self.steps)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> PhaseFacts:
        steps = metadata["steps"]
        return cls(metadata["stage"], metadata["kind"], metadata["prediction"],  # type: ignore[arg-type]
                   int(steps) if steps else None)


@dataclass
class PhaseModel:
    """A finished phase's network, ready to sample and export: what its method says it is.

    ``sample`` and the training previews, the report and ``export`` all go through this and one sampler.
    """

    facts: PhaseFacts
    denoiser: nn.Module
    """``denoiser(x, t, cond) -> raw output`` with the phase's weights."""
    schedule: NoiseSchedule
    latent_channels: int
    network: nn.Module | None = None
    """The diffusers network inside ``denoiser`` (e.g. a ``UNet2DConditionModel``) for ``export``; None: the
    family has no diffusers format."""
    scheduler: Callable[[], Any] | None = None
    """The diffusers scheduler that samples ``network`` as it was trained (export writes its config)."""
    base: str | None = None
    """The pipeline (folder or hub id) the network plugs into, for model cards and ``sample`` of an export."""
    base_network: Callable[[], nn.Module] | None = None
    """The network the student started from, in float32 (LoRA export factors the difference to it)."""
    lora_exclude: list[str] | None = None
    """The layers a LoRA export leaves out (the run's own adapter rule)."""
    export_dtype: str = "float32"
    pipeline: str | None = None
    """The diffusers pipeline class an export plugs into (``StableDiffusionXLPipeline``, ``FluxPipeline``, ...)."""
    network_folder: str = "unet"
    """The network's folder in that pipeline, and the LoRA key prefix: ``unet`` or ``transformer``."""
    embedded_guidance: float = 0.0
    """The guidance value a guidance-distilled network is given (the pipeline's ``guidance_scale`` for Flux)."""
    pipeline_call: dict = field(default_factory=dict)
    """Extra arguments of the family's pipeline call (the teacher's ``pipeline_call``)."""

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: dict[str, Tensor], steps: int | None = None, guidance: float = 0.0,
               null: dict[str, Tensor] | None = None, keeps: tuple[str, ...] = ("time_ids",)) -> Tensor:
        """Clean latents from ``noise`` (drawn as diffusers draws it) in ``steps`` (default: the phase's) Euler
        steps on trailing timesteps, with classifier-free guidance when ``guidance > 1`` (``null``: the
        unconditional input, and ``keeps``, the entries it leaves as they are: see
        :func:`~lightning_distill.models.teacher.null_cond`)."""
        from lightning_distill.inference.sampler import sample_latents
        from lightning_distill.models.teacher import guided

        steps = steps or self.facts.steps
        if steps is None:
            raise ValueError(f"{self.facts.stage}: give the number of sampling steps")
        return sample_latents(guided(self.denoiser, guidance, null, keeps), self.schedule, self.facts.prediction, noise, cond,
                              steps)


class Method:
    """Base class of training methods. Subclasses register in ``METHODS`` and implement the four calls below."""

    log_weights: dict[str, str] = {}
    """Logs that average over part of a batch, each with the log of that part's share: across ranks the loop pools
    such a log weighted by its share (a rank with none of that part counts for nothing); the others by plain mean."""

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
        with :func:`lightning_distill.engine.artifacts.full_state_dict`). Saved as safetensors, keys ``NAME.KEY``."""
        return {}

    def facts(self, phase: Phase) -> PhaseFacts:
        """What ``phase`` makes (called when it ends; saved with its artifact)."""
        raise NotImplementedError

    def phase_model(self, facts: PhaseFacts | None, artifact: dict[str, Tensor] | None) -> PhaseModel:
        """The network a finished phase left (``artifact``, its facts), ready to sample and export; with None for
        both, the base model the method starts from (a distillation's teacher)."""
        raise NotImplementedError

    @torch.no_grad()
    def preview(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Images ``[N, 3, H, W]`` in ``[0, 1]`` for sample grids, or None."""
        return None
