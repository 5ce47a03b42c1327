"""The hooks the loop fires, in order. A callback implements any of them; all receive keyword arguments."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_distill.methods.base import Phase


class Callback:
    """Hooks, in the order the loop fires them::

        on_fit_start(fabric, total_steps, start_step)
          on_phase_start(fabric, phase, modules, step)      # after a resume's state is loaded
            on_step_end(fabric, phase, step, logs, modules)  # logs: name -> detached tensor, every step
            on_log(fabric, phase, step, metrics)              # metrics: name -> float, every train.log_every
            on_preview(fabric, phase, step, images)           # images: [N, 3, H, W] in [0, 1]
          on_phase_result(fabric, phase, modules, step)      # last chance to change what the phase hands on
          on_phase_end(fabric, phase, modules, step)
        on_fit_end(fabric, step, recipe)                    # recipe: the run's validated Recipe
        on_fit_abort(fabric, step, error)                   # instead of on_fit_end, when the run diverged

    ``state_dict()``/``load_state_dict()`` (optional) make a callback's state part of each checkpoint; each rank
    saves its own.
    """

    def on_fit_start(self, **kwargs: Any) -> None: ...
    def on_phase_start(self, *, fabric: Any, phase: Phase, modules: dict[str, nn.Module], step: int) -> None: ...
    def on_step_end(self, **kwargs: Any) -> None: ...
    def on_log(self, *, fabric: Any, phase: Phase, step: int, metrics: dict[str, float]) -> None: ...
    def on_preview(self, *, fabric: Any, phase: Phase, step: int, images: Tensor) -> None: ...
    def on_phase_result(self, **kwargs: Any) -> None: ...
    def on_phase_end(self, **kwargs: Any) -> None: ...
    def on_fit_end(self, **kwargs: Any) -> None: ...
    def on_fit_abort(self, **kwargs: Any) -> None: ...
