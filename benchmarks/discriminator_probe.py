"""Can the discriminator tell the teacher's x_{t-ns} from a frozen student's, and how fast?

Trains ``recipes/tiny/probes/discriminator.yaml`` (one 8-step MSE student, then probe stages that train the
discriminator alone against it) and prints, per probe, the discriminator's accuracy (``d/accuracy``: 0.5 is
chance), its pair accuracy (``d/pair_accuracy``: how often the teacher's sample scores above the student's from
the same x_t, the ranking a relativistic loss learns), its accuracy over the pairs re-noised to the lowest level
(``d/accuracy_lowest``, pooled by ``d/lowest_share``) and its loss early, midway and late. A finished run folder is only read again.

    python benchmarks/discriminator_probe.py [--recipe recipes/tiny/probes/discriminator_flow.yaml] [--out DIR] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import device_name, record, record_arguments, results_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "probes" / "discriminator.yaml"


def windows_of(values: list) -> dict[str, list]:
    """The first, middle and last third of a phase's logged values."""
    n = len(values)
    return {"early": values[: max(1, n // 3)], "middle": values[n // 3 : max(n // 3 + 1, 2 * n // 3)],
            "late": values[2 * n // 3 :]}


def windows(values: list[tuple[int, float]]) -> dict[str, float]:
    """Mean over the first, middle and last third of a phase's logged values."""
    return {name: sum(v for _, v in part) / len(part) for name, part in windows_of(values).items()}


def pooled(values: list[tuple[int, float]], weights: list[tuple[int, float]]) -> dict[str, float | None]:
    """Per third, the values' mean weighted by the weights logged at the same steps (None: no weight there)."""
    weight = dict(weights)
    out: dict[str, float | None] = {}
    for name, part in windows_of([(s, v, weight.get(s, 0.0)) for s, v in values]).items():
        total = sum(w for _, _, w in part)
        out[name] = sum(v * w for _, v, w in part) / total if total else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="a probe recipe (recipes/tiny/probes/)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "tiny-probe"))
    record_arguments(parser)
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
        lowest_tag = f"{phase}/d/accuracy_lowest"  # at the lowest re-noise level, pooled by its share of each batch
        lowest = pooled([(e.step, e.value) for e in events.Scalars(lowest_tag)],
                        [(e.step, e.value) for e in events.Scalars(f"{phase}/d/lowest_share")]) if lowest_tag in tags else {}
        rows.append({"probe": phase, **{f"accuracy {k}": v for k, v in accuracy.items()},
                     **{f"pair accuracy {k}": v for k, v in pair.items()},
                     **{f"lowest level accuracy {k}": v for k, v in lowest.items()},
                     **{f"D loss {k}": v for k, v in loss.items()}})
    recipe = Path(args.recipe).resolve()
    which = [] if recipe == RECIPE else ["--recipe", str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)]
    command = " ".join(["python benchmarks/discriminator_probe.py", *which, *(f"'{o}'" for o in args.overrides)])
    import torch

    record("Discriminator probe (tiny world, D alone against a frozen student)", command,
           device_name(torch.device("cpu")), rows, results_file(args))


if __name__ == "__main__":
    main()
