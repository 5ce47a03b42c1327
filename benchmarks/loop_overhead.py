"""Overhead of the generic Fabric loop on CPU: median step time of the real ``fit`` against the same component
passes (prepare, each optimizer's forward/backward/step) run bare, in one run. Target: ≤ 1.05×.

    python benchmarks/loop_overhead.py --steps 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class StepClock:
    """A callback noting the time at each step's end."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, **_: object) -> None:
        self.times.append(time.perf_counter())


def _median_gap(times: list[float], skip: int) -> float:
    gaps = sorted(b - a for a, b in zip(times[skip:], times[skip + 1 :]))
    return gaps[len(gaps) // 2]


def overrides(steps: int) -> list[str]:
    return [f"schedule.stages=[{{name: s, teacher_steps: 8, student_steps: 4, phases: [{{kind: adversarial, steps: {steps}}}]}}]",
            "train.log_every=1000000", "train.checkpoint_every=1000000", "callbacks=[]", "train.clip_grad_norm=null",
            "data.size=256"]


def loop_time(steps: int) -> float:
    from lightning.fabric import Fabric

    from lightning_distill.engine.loop import fit
    from lightning_distill.config.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "debug.yaml", overrides(steps)).recipe
    clock = StepClock()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[clock])
    with tempfile.TemporaryDirectory() as out:
        fit(fabric, recipe, Path(out), [clock])
    return _median_gap(clock.times, skip=3)


def bare_time(steps: int) -> float:
    from torch.utils.data import default_collate

    from lightning_distill.config.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "debug.yaml", overrides(steps)).recipe
    phases = recipe.schedule.build().phases()
    phase = phases[0]
    torch.manual_seed(0)
    method = recipe.method.build(phases=phases, codec=recipe.codec.build(), seed=0)
    modules = method.build_phase(phase, lambda i: {})
    modules["teacher"].requires_grad_(False)
    optimizers = {n: recipe.optimizer.build([p for p in modules[n].parameters() if p.requires_grad], lr=s.lr,
                                            betas=s.betas, weight_decay=s.weight_decay)
                  for n, s in phase.optimizers.items()}
    trainable = {n: [p for p in modules[n].parameters() if p.requires_grad] for n in phase.optimizers}
    data = recipe.data.build(seed=0)
    method.attach(modules)
    times = []
    for step in range(steps):
        batch = default_collate([data[(step * recipe.train.batch_size + i) % len(data)] for i in range(recipe.train.batch_size)])
        prepared = method.prepare(batch, step)
        for name in phase.optimizers_at(step):
            for other, params in trainable.items():
                for p in params:
                    p.requires_grad_(other == name)
            loss, _ = method.training_step(prepared, name)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        times.append(time.perf_counter())
    return _median_gap(times, skip=3)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved bare/loop rounds (best of each)")
    parser.add_argument("--results", default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # steadier timings on a shared machine
    bare, loop = bare_time(args.steps), loop_time(args.steps)
    for _ in range(args.rounds - 1):  # interleaved rounds, so drift of the machine hits both; best of each
        bare, loop = min(bare, bare_time(args.steps)), min(loop, loop_time(args.steps))
    row = {"steps": args.steps, "rounds": args.rounds, "bare ms/step": 1000 * bare, "loop ms/step": 1000 * loop, "ratio": loop / bare,
           "target": "<= 1.05"}
    from common import RESULTS

    record("Loop overhead (debug recipe, adversarial phase, CPU)",
           "python benchmarks/loop_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           device_name(torch.device("cpu")), [row], None if args.no_record else Path(args.results or RESULTS))
    return row


if __name__ == "__main__":
    main()
