"""A run folder read back: its recipe, its finished phases, their artifacts and the facts recorded with them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from lightning_distill.config.recipe import LoadedRecipe, load_recipe
from lightning_distill.engine.artifacts import artifact_path, load_artifact
from lightning_distill.errors import UserError
from lightning_distill.methods.base import Method, Phase, PhaseFacts, PhaseModel


class RunFolder:
    """A run folder (``recipe.yaml``, ``phases/``, ``checkpoints/``) as ``sample``, ``export`` and the report read it.

    Args:
        path: the run folder.
        loaded: its recipe when already loaded (the report callback has it); default: read ``recipe.yaml``.
    """

    def __init__(self, path: Path, loaded: LoadedRecipe | None = None) -> None:
        self.path = Path(path)
        if loaded is None:
            recipe = self.path / "recipe.yaml"
            if not recipe.is_file():
                raise UserError(f"{self.path} is not a run folder (no recipe.yaml)")
            loaded = load_recipe(recipe)
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.phases: list[Phase] = self.recipe.schedule.build().phases()

    def artifact_path(self, phase: Phase) -> Path:
        return artifact_path(self.path / "phases", phase.index, phase.name)

    def pick(self, stage: str | None = None) -> Phase:
        """The last finished phase of ``stage`` (a stage or phase name), or of the whole run."""
        phases = self.phases
        if stage is not None:
            phases = [p for p in phases if stage in (p.stage, p.name)]
            if not phases:
                names = sorted({p.stage for p in self.phases} | {p.name for p in self.phases})
                raise UserError(f"--stage {stage!r}: no such stage or phase in {self.path}; choose one of {', '.join(names)}")
        done = [p for p in phases if self.artifact_path(p).is_file()]
        if not done:
            raise UserError(f"{self.path}: no finished phase{f' of {stage}' if stage else ''} yet "
                            f"(nothing in {self.path / 'phases'})")
        return done[-1]

    def artifact(self, phase: Phase) -> dict[str, Tensor]:
        return load_artifact(self.artifact_path(phase))

    def facts(self, phase: Phase) -> PhaseFacts:
        """The facts the method recorded when ``phase`` ended."""
        path = self.artifact_path(phase)
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        try:
            return PhaseFacts.from_metadata(metadata)
        except KeyError as err:
            raise UserError(f"{path} records no phase facts ({err.args[0]}): it was written by an older version; "
                            "train that phase again in a new run folder") from err

    def method(self, codec: Any = None) -> Method:
        return self.recipe.method.build(phases=self.phases, codec=codec, seed=self.recipe.seed)

    def phase_model(self, phase: Phase, method: Method | None = None) -> PhaseModel:
        """The network ``phase`` left, as its method makes it."""
        return (method or self.method()).phase_model(self.facts(phase), self.artifact(phase))
