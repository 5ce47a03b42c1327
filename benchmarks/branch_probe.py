"""The MSE ladder of a fidelity table again, one setting changed, paired with the table's runs seed by seed.

The MSE branch of a tiny job (``m4`` branching from ``s8``, then ``m2``, ``m1``) depends on the 8-step student, on its
phases' indices (each phase seeds its noise by its index) and on where the run's shared stream of batches stands
when it starts; it does not depend on the Lightning stages trained before it. So it can be trained again without
them: for each seed this copies the run's 8-step student, marks the Lightning phases done with empty placeholder
results (the branch never loads them), puts the data loader where the run had it at the branch's start, and trains
the branch up to the last of its ``--report`` stages with the overrides (say, a longer ``m1``). The stages the overrides leave alone repeat
the table's rows (up to the processor's rounding: check them in the printed table), so a change in the last one
is paired with the table seed by seed, at the cost of the branch alone (about 8 minutes a seed for the flow job,
against 21 for the whole job). A finished folder is only read again.

    python benchmarks/branch_probe.py --runs runs/fidelity-flow --recipe recipes/tiny/flow_lightning.yaml \\
        --out runs/branch-probe/m1-320 --seeds 0 1 2 -- schedule.stages.m1.phases.0.steps=320
"""

from __future__ import annotations

import shlex
import shutil
import sys
from functools import partial
from pathlib import Path

from common import device_name, mark_done, over_seeds, probe_arguments, record, results_file, student_rows, train_probe

ROOT = Path(__file__).resolve().parents[1]


def prepare(source: Path, out: Path, recipe: Path, overrides: list[str], branch: str) -> None:
    """``out`` as a run of ``recipe`` whose phases before stage ``branch`` are done: ``source``'s first phase (the
    student the branch starts from), placeholders for the rest, the loader at the branch's first step."""
    from safetensors.torch import save_file

    from lightning_distill.config.recipe import load_recipe
    from lightning_distill.engine.artifacts import artifact_path, digest_path

    loaded = load_recipe(str(recipe), overrides).recipe
    schedule = loaded.schedule.build()
    phases = schedule.phases()
    first = next((p for p in phases if p.stage == branch), None)
    if first is None or first.index == 0:
        sys.exit(f"{recipe}: no stage {branch!r} after the first phase")
    stage = next(s for s in schedule.stages() if s.name == branch)
    if stage.branch_from != phases[0].stage:
        sys.exit(f"{recipe}: stage {branch!r} must branch from the first stage ({phases[0].stage!r}), not "
                 f"{stage.branch_from!r}: only then do the phases before it not matter")
    start = artifact_path(source / "phases", 0, phases[0].name)
    if not start.is_file():
        sys.exit(f"{source} has no result of phase {phases[0].name!r} ({start})")
    (out / "phases").mkdir(parents=True)
    shutil.copy2(start, out / "phases" / start.name)
    if digest_path(start).is_file():
        shutil.copy2(digest_path(start), out / "phases" / digest_path(start).name)
    for p in phases[1 : first.index]:
        save_file({}, str(artifact_path(out / "phases", p.index, p.name)))  # never loaded: the branch skips them
    n = first.start
    batches = n * loaded.train.grad_accum  # one per micro-batch
    samples = batches * loaded.train.batch_size
    if samples >= len(loaded.data.build(seed=loaded.seed)):
        sys.exit(f"{recipe}: the branch starts past the data set's first epoch; this probe places the loader in it only")
    loader = {"_index_sampler_state": None, "_sampler_iter_yielded": batches, "_num_yielded": batches,
              "_sampler_iter_state": {"samples_yielded": samples, "sampler_iter_state": {"epoch": 0, "pos": samples}},
              "_IterableDataset_len_called": None, "_shared_seed": None, "fetcher_state": None, "dataset_state": None,
              "_iterator_finished": False}
    mark_done(out, phases[first.index - 1], loader)


def main() -> None:
    parser = probe_arguments(__doc__.splitlines()[0], "the table's recipe (recipes/tiny/*lightning.yaml)")
    parser.add_argument("--branch", default="m4", help="the branch's first stage")
    parser.add_argument("--report", nargs="+", default=["m2", "m1"], help="the branch's stages to report; the last "
                        "is where training stops")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = Path(args.recipe).resolve()
    models = ", ".join(f"{{model: mse, stage: {s}}}" for s in args.report)
    report = ("callbacks=[{name: report, samples: 256, teacher: {steps: [32], guidance: 3.0, unguided: false}, "
              f"models: [{models}]}}]")
    fixed = [f"schedule.until={args.report[-1]}", report]
    rows = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed-{seed}"
        overrides = [f"seed={seed}", *fixed, *args.overrides]
        train_probe(out, recipe, overrides,
                    partial(prepare, Path(args.runs) / f"seed-{seed}", out, recipe, overrides, args.branch))
        rows += student_rows(out, seed)
    summary = over_seeds(rows, {"fd": ".3f", "fd_patch": ".4f"})
    named = str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe)
    tail = ["--", *map(shlex.quote, args.overrides)] if args.overrides else []  # runnable as printed
    command = " ".join(["python benchmarks/branch_probe.py", "--runs", args.runs, "--recipe", named, "--seeds",
                        *map(str, args.seeds), *tail])
    import torch

    record(f"Branch probe: the MSE branch of {recipe.name} from the runs in {Path(args.runs).name}, paired "
           "(mean ± sd over seeds)", command, device_name(torch.device("cpu")), summary,
           results_file(args))


if __name__ == "__main__":
    main()
