"""One stage again, from the starts that finished runs left: is a change to a stage larger than the stage's own noise?

A full run per setting costs 10 minutes and mixes a change to the 1-step stage with every stage before it. This
probe takes the runs ``benchmarks/fidelity.py`` left (``--runs``: one ``seed-N`` folder each; any finished runs whose
phases before the stage are the probe's will do, such as a job cut with ``schedule.until`` and a report on its last
stage, which makes starts more cheaply: the probe recipes' headers give the commands) and a probe recipe whose
ladder is theirs cut after the probed stage (``schedule.until``: the stages before it unchanged, the last stage
as shipped or as the variant's overrides want it: ``recipes/tiny/probes/stage_*.yaml``). For each seed it copies the
finished phases before the stage into a new run folder, marks them done with a checkpoint at the stage's first step
(the data loader's state is the finished run's last, so the stage sees a fresh stream of batches), trains the stage
alone and its report, and prints each of the report's student rows per seed and as mean ± sd over the seeds. Two
variants of a stage on the same seeds start from the same students: a difference between them is the variant's, a
spread within one is the stage's own. A finished probe folder is only read again.

    python benchmarks/stage_probe.py --runs runs/fidelity --recipe recipes/tiny/probes/stage_l1.yaml \\
        --out runs/stage-probe/l1 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import shlex
import shutil
import sys
from functools import partial
from pathlib import Path

from common import device_name, mark_done, over_seeds, probe_arguments, record, results_file, student_rows, train_probe

ROOT = Path(__file__).resolve().parents[1]


def prepare(source: Path, out: Path, recipe: Path, overrides: list[str]) -> None:
    """``out`` as a run of ``recipe`` that finished every phase before its last stage, with ``source``'s results."""
    import torch

    from lightning_distill.config.recipe import load_recipe
    from lightning_distill.engine.artifacts import artifact_path
    from lightning_distill.engine.checkpoint import Checkpoints

    probe = load_recipe(str(recipe), overrides).recipe.schedule.build().phases()
    ran = load_recipe(str(source / "recipe.yaml"), []).recipe.schedule.build().phases()
    stage = probe[-1].stage
    before = [p for p in probe if p.stage != stage]
    if not before or any(p.stage == stage for p in probe[: len(before)]):
        sys.exit(f"{recipe}: the probed stage {stage!r} must be the last stage, after the stages it starts from")
    for p in before:
        same = next((q for q in ran if q.index == p.index), None)
        if same is None or (same.name, same.start, same.end) != (p.name, p.start, p.end):
            sys.exit(f"{recipe}: phase {p.index} ({p.name}, steps {p.start}-{p.end}) is not the run's in {source} "
                     f"({same.name + f', steps {same.start}-{same.end}' if same else 'none'}); the stages before "
                     f"{stage!r} must be the run's own")
    last = Checkpoints(source / "checkpoints", fabric=None, keep_last=1).latest()  # reads folders only
    if last is None or not (source / "metrics.json").is_file():
        sys.exit(f"{source} is not a finished run (no checkpoint or metrics.json)")
    out.mkdir(parents=True)
    (out / "phases").mkdir()
    for p in before:
        file = artifact_path(source / "phases", p.index, p.name)
        for f in (file, file.with_name(file.name + ".json")):
            if f.is_file():
                shutil.copy2(f, out / "phases" / f.name)
    mark_done(out, before[-1], torch.load(last / "rank-0.pt", weights_only=True)["loader"])


def main() -> None:
    parser = probe_arguments(__doc__.splitlines()[0], "a stage probe recipe (recipes/tiny/probes/stage_*.yaml)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = Path(args.recipe).resolve()
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        overrides = [f"seed={seed}", *args.overrides]
        train_probe(out, recipe, overrides, partial(prepare, Path(args.runs) / f"seed-{seed}", out, recipe, overrides))
        rows += student_rows(out, seed)
    summary = over_seeds(rows, {"fd": ".1f"})
    named = str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)
    overrides = ["--", *map(shlex.quote, args.overrides)] if args.overrides else []  # runnable as printed
    command = " ".join(["python benchmarks/stage_probe.py", "--runs", args.runs, "--recipe", named, "--seeds",
                        *map(str, args.seeds), *overrides])
    import torch

    record(f"Stage probe: {recipe.name} from the runs in {Path(args.runs).name} (mean ± sd over seeds)", command,
           device_name(torch.device("cpu")), summary, results_file(args))


if __name__ == "__main__":
    main()
