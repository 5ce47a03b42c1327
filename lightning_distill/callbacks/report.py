"""Evaluate the run when training ends: ``report.md``, ``metrics.json``, PNG grids and TensorBoard scalars; and,
while training, the instruments of every adversarial phase (``instruments.json``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lightning_distill.eval.evaluate import EvalConfig, check_rows, evaluate_run, summary
from lightning_distill.config.registry import CALLBACKS
from lightning_distill.callbacks.base import Callback
from lightning_distill.utils.files import write_atomically

ACCURACY = "d/accuracy"
"""The discriminator step's log of how often it tells teacher from student (0.5: chance)."""
PAIR_ACCURACY = "d/pair_accuracy"
"""The discriminator step's log of how often it scores the teacher's sample above the student's from the same x_t."""
LOSS_RATIO = "d/loss_ratio"
"""The discriminator step's log of its loss over the loss's value at chance (1: it has learnt nothing)."""
ACCURACY_LOWEST, LOWEST_SHARE = "d/accuracy_lowest", "d/lowest_share"
"""The discriminator step's accuracy over the pairs re-noised to the phase's lowest level, and their share of the
batch (the weight it is pooled with)."""
GAP = "mse_to_teacher"
"""The student step's log of its mean squared distance to the teacher's target."""


WINDOWS = (("d_accuracy_warmup", ACCURACY, "warm"), ("d_accuracy_end", ACCURACY, "end"),
           ("d_pair_accuracy_warmup", PAIR_ACCURACY, "warm"), ("d_pair_accuracy_end", PAIR_ACCURACY, "end"),
           ("student_teacher_gap", GAP, "end"),
           ("d_loss_ratio_warmup", LOSS_RATIO, "warm"), ("d_loss_ratio_end", LOSS_RATIO, "end"),
           ("d_accuracy_lowest_warmup", ACCURACY_LOWEST, "warm", LOWEST_SHARE),
           ("d_accuracy_lowest_end", ACCURACY_LOWEST, "end", LOWEST_SHARE))
"""The instruments of an adversarial phase: its row key, the log it averages, over which window, and the log that
weights each step (none: every step counts once)."""
SLOTS = 2 * len(WINDOWS)


def instrument_windows(phase: Any) -> tuple[range, range]:
    """Iterations (from 0 within ``phase``) over which the instruments average: the last fifth of the
    discriminator's warm-up (with no warm-up, the first fifth of the phase) and the last fifth of the phase."""
    warmup = phase.optimizers["student"].after if "student" in phase.optimizers else 0
    span = warmup or phase.steps
    warm = range(warmup - max(1, math.ceil(warmup / 5)), warmup) if warmup else range(0, max(1, math.ceil(span / 5)))
    end = range(phase.steps - max(1, math.ceil(phase.steps / 5)), phase.steps)
    return warm, end


@CALLBACKS.register("report")
class Report(Callback):
    """Samples the teacher and each listed stage's student on the same prompts and noise and scores them
    (see :mod:`lightning_distill.eval.evaluate`). Runs on rank 0 after the last phase, also when a finished run is
    started again. During training it records, per adversarial phase, the discriminator's accuracy and pair
    accuracy at the end of its warm-up and at the end of the phase, and the student's distance to its teacher
    (``instruments.json``, a table in the report)."""

    Config = EvalConfig

    def __init__(self, config: EvalConfig, *, out_dir: Path) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.rows: list[dict[str, Any]] = []
        self._phase: str | None = None
        self._sums = torch.zeros(SLOTS)  # (sum, count) per instrument and window, in the order of WINDOWS

    @staticmethod
    def check(config: EvalConfig, phases: list[Any]) -> None:
        check_rows(config, phases)

    # -- instruments ----------------------------------------------------------------------------------------
    def on_phase_start(self, *, phase: Any, **_: Any) -> None:
        if self._phase != phase.name:  # not resumed inside this phase
            self._phase, self._sums = phase.name, torch.zeros(SLOTS)

    def on_step_end(self, *, phase: Any, step: int, logs: dict[str, torch.Tensor], **_: Any) -> None:
        if "discriminator" not in phase.optimizers:
            return
        i = step - 1 - phase.start
        warm, end = instrument_windows(phase)
        for slot, (_, key, which, *weighted) in enumerate(WINDOWS):
            slot, window = 2 * slot, warm if which == "warm" else end
            if key in logs and i in window:
                value = logs[key].detach().float().reshape(())
                weight = logs[weighted[0]].detach().float().reshape(()) if weighted else 1.0
                if self._sums.device != value.device:  # summed where the logs live: no host sync per step
                    self._sums = self._sums.to(value.device)
                self._sums[slot] += value * weight
                self._sums[slot + 1] += weight

    def on_phase_result(self, *, fabric: Any, phase: Any, **_: Any) -> None:
        if "discriminator" not in phase.optimizers:
            return
        sums = self._sums
        if fabric.world_size > 1:  # each rank judged its own samples: the mean over ranks
            sums = fabric.all_reduce(sums.to(fabric.device), reduce_op="mean")
        sums = sums.cpu()

        def mean(total: torch.Tensor, count: torch.Tensor) -> float | None:
            return round(float(total / count), 4) if count > 0 else None

        row = {"phase": phase.name, **{w[0]: mean(sums[2 * i], sums[2 * i + 1]) for i, w in enumerate(WINDOWS)}}
        path = self.out_dir / "instruments.json"
        if path.is_file():  # earlier phases, also those of the run before a resume (callback state is per phase)
            self.rows = [r for r in json.loads(path.read_text())["phases"] if r["phase"] not in {x["phase"] for x in self.rows}] + self.rows
        self.rows = [r for r in self.rows if r["phase"] != phase.name] + [row]
        if fabric.is_global_zero:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps({"phases": self.rows}, indent=2))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "phase": self._phase, "sums": self._sums.cpu().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sums = torch.tensor(state["sums"])
        if len(sums) == 6:  # a checkpoint from before the pair accuracy: its instruments, none of that one
            sums = torch.cat([sums[:4], torch.zeros(4), sums[4:]])
        if len(sums) < SLOTS:  # from before the loss ratio or the lowest level's accuracy (the newest come last)
            sums = torch.cat([sums, torch.zeros(SLOTS - len(sums))])
        self.rows, self._phase, self._sums = state["rows"], state["phase"], sums

    # -- evaluation -----------------------------------------------------------------------------------------
    def on_fit_end(self, *, fabric: Any, recipe: Any, **_: Any) -> None:
        if fabric.is_global_zero:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            try:
                tree = evaluate_run(self.out_dir, recipe, self.config, fabric.device, writer)
            finally:
                writer.close()
            print(summary(tree, self.out_dir))
        fabric.barrier()
