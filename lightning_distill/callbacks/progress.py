"""A progress bar on rank 0: stage, phase, step/total, loss, it/s and ETA."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from lightning_distill.methods.base import Phase
from lightning_distill.config.registry import CALLBACKS
from lightning_distill.callbacks.base import Callback


@CALLBACKS.register("progress")
class Progress(Callback):
    """tqdm bar over all steps of the run; the description names the stage and phase, the postfix the losses."""

    @dataclass(kw_only=True)
    class Config:
        disable: bool = False
        mininterval: float = 0.5

    def __init__(self, config: Config, *, out_dir: Any = None) -> None:
        self.config = config
        self.bar: Any = None

    def on_fit_start(self, *, fabric: Any, total_steps: int, start_step: int, **_: Any) -> None:
        if not fabric.is_global_zero or self.config.disable:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            unit="step",
            dynamic_ncols=True,
            mininterval=self.config.mininterval,
            file=sys.stderr,
        )

    def on_phase_start(self, *, phase: Phase, **_: Any) -> None:
        if self.bar is not None:
            self.bar.set_description(f"stage {phase.stage} · {phase.name}")

    def on_step_end(self, **_: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, *, metrics: dict[str, float], **_: Any) -> None:
        if self.bar is not None:
            shown = {k.removeprefix("loss/"): f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss/")}
            if "d/accuracy" in metrics:  # 0.5: by sign at chance (d/pair_accuracy says whether it still ranks pairs)
                shown["D acc"] = f"{metrics['d/accuracy']:.2f}"
            self.bar.set_postfix(shown, refresh=False)

    def on_fit_end(self, **_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_fit_abort = on_fit_end
