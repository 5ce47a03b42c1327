"""``lightning-distill``: train, validate, plan, cache, export, sample, report, components.

Exit codes: 0 done, 2 user error (one clear message; ``--debug`` shows the traceback), 1 a diverged run (one
message; the newest checkpoint holds the last finite weights) or an internal error.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
import traceback

from lightning_distill.errors import Diverged, UserError
from lightning_distill.plan.planner import GPUS

WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}
"""Errors of the file system the user can fix (full disk or quota, read-only or forbidden folder, file too large)."""

EPILOG = """examples:
  lightning-distill train recipes/debug.yaml --out runs/debug
  lightning-distill train recipes/debug.yaml --out runs/debug train.batch_size=8 fabric.devices=2
  lightning-distill validate recipes/debug.yaml schedule.stages.0.phases.0.steps=10
  lightning-distill export runs/sdxl --format lora --out exports/sdxl-lora
  lightning-distill sample runs/sdxl --prompt "a photo of a cat" --seed 0 --out cat.png
  lightning-distill report runs/tiny "callbacks.report.models=[{model: cond, stage: l1-cond}]" --out runs/tiny-l1-cond
  lightning-distill plan recipes/sdxl_lightning/lora.yaml --gpu 4090
  lightning-distill components loss
"""


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-distill",
        description="Progressive adversarial diffusion distillation (SDXL-Lightning) with Lightning Fabric.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a recipe (re-running on the same --out resumes)")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", help="KEY=VALUE dotted overrides, e.g. train.batch_size=8")
    train.add_argument("--out", help="run folder (default: the recipe's 'out')")
    validate = sub.add_parser("validate", help="validate a recipe and print it resolved")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    cache = sub.add_parser("cache", help="encode a recipe's data once (latents and text embeddings) for training")
    cache.add_argument("recipe")
    cache.add_argument("overrides", nargs="*")
    cache.add_argument("--out", required=True, help="cache folder (then train with data: {name: cached, root: DIR})")
    cache.add_argument("--shard-size", type=positive, default=1000, help="samples per shard file (default 1000)")
    export = sub.add_parser("export", help="write a finished phase of a run for diffusers or ComfyUI")
    export.add_argument("run", help="run folder (the --out of train)")
    export.add_argument("--format", choices=["diffusers", "lora", "comfyui"], default="diffusers")
    export.add_argument("--stage", help="stage or phase name (default: the last finished phase)")
    export.add_argument("--rank", type=positive, default=64, help="LoRA rank for lora/comfyui (default 64)")
    export.add_argument("--out", required=True, help="folder to write")
    sample = sub.add_parser("sample", help="an image grid from a run or an exported model")
    sample.add_argument("model", help="run folder, or a folder written by export")
    sample.add_argument("--prompt", action="append", default=[], help="repeat for several images")
    sample.add_argument("--steps", type=positive, help="default: the model's step count")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--size", type=positive, help="image size in pixels (default: the resolution the run trained at; for an export made "
                        "before exports recorded it, the pipeline's own default)")
    sample.add_argument("--stage", help="run folders: stage or phase name (default: the last finished phase)")
    sample.add_argument("--base", help="exported models: base pipeline (default: the one it was distilled from)")
    sample.add_argument("--out", required=True, help="PNG file to write")
    report = sub.add_parser("report", help="evaluate a run's finished students again, optionally with other report rows")
    report.add_argument("run", help="run folder (the --out of train)")
    report.add_argument("overrides", nargs="*", help="KEY=VALUE settings under callbacks, e.g. "
                        "callbacks.report.models=[{model: cond, stage: l1-cond}]")
    report.add_argument("--out", help="folder for report.md, metrics.json and samples/ (default: the run folder; "
                        "required with overrides)")
    plan = sub.add_parser("plan", help="memory per device and FLOPs of every phase, before anything runs")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("--gpu", help=f"whether each phase fits, and a time per step: one of {', '.join(GPUS)}")
    plan.add_argument("--gpu-memory", type=float, help="GiB of another device (with --gpu-tflops)")
    plan.add_argument("--gpu-tflops", type=float, help="its dense bf16 TFLOP/s")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    components = sub.add_parser("components", help="list registered components and their settings")
    components.add_argument("role", nargs="?", help="only this role (teacher, loss, ...)")
    components.add_argument("--recipe", help="also what this recipe's imports: register")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Options may follow KEY=VALUE overrides; argparse's nargs="*" positional would stop at them.
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # allowed after the subcommand too
        args.debug = True
        extra = [a for a in extra if a != "--debug"]
    if extra:
        unknown = [a for a in extra if a.startswith("-")]
        if unknown or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    from lightning_distill.engine.run import set_up_logging

    set_up_logging(args.debug)
    try:
        return _dispatch(args)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        if args.debug:
            traceback.print_exc()
        print(f"diverged: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in WRITE_FAULTS:
            raise
        if args.debug:
            traceback.print_exc()
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot write{where}: {err.strerror or err}. Nothing written before was changed; free space (or "
              "fix the folder's permissions) and run the same command again to go on from the last checkpoint",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from lightning_distill.config.recipe import dump_recipe, load_recipe
    from lightning_distill.engine.run import describe_components, run_folder, train

    if args.command == "components":
        if args.recipe:
            load_recipe(args.recipe)  # imports its modules (and validates it)
        print(describe_components(args.role))
        return 0
    if args.command == "export":
        from lightning_distill.export.diffusers import export

        meta = export(Path(args.run), args.format, Path(args.out), stage=args.stage, rank=args.rank)
        print(f"exported {meta['phase']} ({str(meta['steps']) + ' steps, ' if meta['steps'] else ''}{meta['prediction']}) as {args.format} to {args.out}")
        return 0
    if args.command == "sample":
        from lightning_distill.inference.sample import check_output, sample_exported, sample_run, save_grid

        check_output(Path(args.out), args.size)
        model = Path(args.model)
        if (model / "recipe.yaml").is_file():
            images = sample_run(model, args.prompt, args.steps, args.seed, args.size, args.stage)
        else:
            images = sample_exported(model, args.prompt, args.steps, args.seed, args.size, args.base)
        save_grid(images, Path(args.out))
        print(f"wrote {len(images)} samples to {args.out}")
        return 0
    if args.command == "report":
        from lightning_distill.eval.evaluate import report_run

        report_run(Path(args.run), args.overrides, Path(args.out) if args.out else None)
        return 0
    loaded = load_recipe(args.recipe, args.overrides)
    if args.command == "cache":
        from lightning_distill.data.cache import build_cache

        manifest = build_cache(loaded.recipe, Path(args.out), args.shard_size)
        print(f"cached {manifest['total']} samples in {len(manifest['shards'])} shards to {args.out}")
        if manifest["skipped"]:
            print(manifest["skipped"])
        return 0
    if args.command == "plan":
        import json

        from lightning_distill.plan import gpu_spec, plan_recipe, plan_table

        gpu = gpu_spec(args.gpu, args.gpu_memory, args.gpu_tflops)
        plans = plan_recipe(loaded, gpu, args.mfu, progress=True)
        if args.json:
            print(json.dumps({"phases": [p.to_dict() for p in plans], "gpu": gpu}, indent=2))
        else:
            print(plan_table(plans, gpu))
        return 0
    if args.command == "validate":
        print(dump_recipe(loaded.resolved), end="")
        return 0
    out_dir = run_folder(loaded, args.out)
    metrics = train(loaded, out_dir)
    if metrics:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith("loss/"))
        print(f"done: {out_dir} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
