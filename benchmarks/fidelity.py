"""Does the method win in miniature? Both ladders of the main job (and the teacher rows) over several training seeds.

Trains ``recipes/tiny/ablations/from_mse.yaml`` once per seed (the evaluation's prompts and noise stay the same):
the main job, ``recipes/tiny/lightning.yaml``, with its 2- and 1-step adversarial stages appended again from the MSE
ladder's students (the ``adversarial-from-mse`` rows; every other row is the main job's, bit for bit). It collects
each run's ``metrics.json`` rows, writes ``benchmarks/fidelity.json`` and appends a table of mean ± sd per model and
step count to ``benchmarks/RESULTS.md``. Finished runs are only read again, so a killed benchmark resumes.

    python benchmarks/fidelity.py [--seeds 0 1 2] [--out runs/fidelity] [KEY=VALUE ...]
    python benchmarks/fidelity.py --recipe recipes/tiny/ablations/from_mse_flow.yaml --out runs/fidelity-flow \
        --json benchmarks/fidelity_flow.json          # the same ladders on the flow-matching transformer teacher
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from common import device_name, record, record_arguments, results_file, summarise

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "ablations" / "from_mse.yaml"
METRICS = ("fd", "fd_patch", "fd_teacher", "fd_patch_teacher", "adherence", "diversity", "diversity_per_prompt",
           "coverage")
INSTRUMENTS = ("d_accuracy_warmup", "d_accuracy_end", "d_pair_accuracy_warmup", "d_pair_accuracy_end", "d_loss_ratio_warmup",
               "d_loss_ratio_end", "d_accuracy_lowest_warmup", "d_accuracy_lowest_end", "student_teacher_gap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--out", default=str(ROOT / "runs" / "fidelity"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "fidelity.json"))
    record_arguments(parser)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results, discriminator = [], []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        if not (out / "metrics.json").is_file():
            done = subprocess.run([sys.executable, "-m", "lightning_distill", "train", args.recipe, "--out", str(out),
                                   f"seed={seed}", *args.overrides], cwd=ROOT)
            if done.returncode:
                sys.exit(done.returncode)
        tree = json.loads((out / "metrics.json").read_text())
        results += [{**r, "seed": seed} for r in tree["results"]]
        discriminator += [{**r, "seed": seed} for r in tree.get("discriminator", [])]
    recipe = Path(args.recipe).resolve()
    named = [] if recipe == RECIPE else ["--recipe", str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)]
    command = " ".join(["python benchmarks/fidelity.py", *named, "--seeds", *map(str, args.seeds),
                        *(["--", *map(shlex.quote, args.overrides)] if args.overrides else [])])  # runnable as printed
    Path(args.json).write_text(json.dumps({"command": command, "seeds": args.seeds, "results": results,
                                           "discriminator": discriminator}, indent=1))
    import torch

    record(f"Fidelity in miniature: both ladders of {recipe.name} over seeds {args.seeds} (mean ± sd)", command,
           device_name(torch.device("cpu")), summarise(results, METRICS), results_file(args))
    if discriminator:  # per adversarial phase: does the discriminator leave chance?
        by_phase = [{"model": r["phase"], "steps": "", **r} for r in discriminator]
        table = [{"phase": r["model"], "seeds": r["seeds"], **{k: r.get(k, "–") for k in INSTRUMENTS}}
                 for r in summarise(by_phase, INSTRUMENTS)]  # – where a phase has no such instrument
        record(f"Discriminators of {recipe.name} over seeds {args.seeds} (mean ± sd)", command,
               device_name(torch.device("cpu")), table, results_file(args))


if __name__ == "__main__":
    main()
