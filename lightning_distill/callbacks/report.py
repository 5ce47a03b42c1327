"""Evaluate the run when training ends: ``report.md``, ``metrics.json``, PNG grids and TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_distill.eval.evaluate import EvalConfig, check_rows, evaluate_run
from lightning_distill.config.registry import CALLBACKS
from lightning_distill.callbacks.base import Callback


@CALLBACKS.register("report")
class Report(Callback):
    """Samples the teacher and each listed stage's student on the same prompts and noise and scores them
    (see :mod:`lightning_distill.evaluate`). Runs on rank 0 after the last phase, also when a finished run is
    started again."""

    Config = EvalConfig

    def __init__(self, config: EvalConfig, *, out_dir: Path) -> None:
        self.config = config
        self.out_dir = Path(out_dir)

    @staticmethod
    def check(config: EvalConfig, phases: list[Any]) -> None:
        check_rows(config, phases)

    def on_fit_end(self, *, fabric: Any, recipe: Any, **_: Any) -> None:
        if fabric.is_global_zero:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            try:
                tree = evaluate_run(self.out_dir, recipe, self.config, fabric.device, writer)
            finally:
                writer.close()
            width = max(len(r["model"]) for r in tree["results"])
            lines = [f"{r['model']:<{width}} {r['steps']:>3} steps  " + "  ".join(
                f"{k} {v:.3f}" for k, v in r.items() if k not in ("model", "steps", "seconds")) for r in tree["results"]]
            print("evaluation (" + str(self.out_dir / "report.md") + "):\n  " + "\n  ".join(lines))
        fabric.barrier()
