"""Can the discriminator tell the teacher's x_{t-ns} from a frozen student's, and how fast?

Trains ``recipes/tiny/probes/discriminator.yaml`` (one 8-step MSE student, then probe stages that train the
discriminator alone against it) and prints, per probe, the discriminator's accuracy (``d/accuracy``: 0.5 is
chance), its pair accuracy (``d/pair_accuracy``: how often the teacher's sample scores above the student's from
the same x_t, the ranking a relativistic loss learns) and its loss early, midway and late. A finished run folder is only read again.

    python benchmarks/discriminator_probe.py [--recipe recipes/tiny/probes/discriminator_flow.yaml] [--out DIR] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import RESULTS, device_name, record

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "probes" / "discriminator.yaml"


def windows(values: list[tuple[int, float]]) -> dict[str, float]:
    """Mean over the first, middle and last third of a phase's logged values."""
    n = len(values)
    thirds = [values[: max(1, n // 3)], values[n // 3 : max(n // 3 + 1, 2 * n // 3)], values[2 * n // 3 :]]
    return {name: sum(v for _, v in part) / len(part) for name, part in zip(("early", "middle", "late"), thirds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="a probe recipe (recipes/tiny/probes/)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "tiny-probe"))
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    done = subprocess.run([sys.executable, "-m", "lightning_distill", "train", args.recipe, "--out", args.out,
                           *args.overrides], cwd=ROOT)
    if done.returncode:
        sys.exit(done.returncode)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(args.out) / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    rows = []
    for tag in sorted(t for t in tags if t.endswith("/d/accuracy") and not t.startswith("all/")):
        phase = tag[: -len("/d/accuracy")]
        accuracy = windows([(e.step, e.value) for e in events.Scalars(tag)])
        loss = windows([(e.step, e.value) for e in events.Scalars(f"{phase}/loss/discriminator")])
        pair_tag = f"{phase}/d/pair_accuracy"  # runs from before the instrument lack it
        pair = windows([(e.step, e.value) for e in events.Scalars(pair_tag)]) if pair_tag in tags else {}
        rows.append({"probe": phase, **{f"accuracy {k}": v for k, v in accuracy.items()},
                     **{f"pair accuracy {k}": v for k, v in pair.items()},
                     **{f"D loss {k}": v for k, v in loss.items()}})
    recipe = Path(args.recipe).resolve()
    which = [] if recipe == RECIPE else ["--recipe", str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)]
    command = " ".join(["python benchmarks/discriminator_probe.py", *which, *(f"'{o}'" for o in args.overrides)])
    import torch

    record("Discriminator probe (tiny world, D alone against a frozen student)", command,
           device_name(torch.device("cpu")), rows, None if args.no_record else RESULTS)


if __name__ == "__main__":
    main()
