"""Evaluate a distillation run: sample the teacher and each stage's student on the same prompts and noise, score
the samples with registered metrics, and write ``report.md``, ``metrics.json``, PNG grids and TensorBoard scalars.

The ``report`` callback calls :func:`evaluate_run` when training ends; ``lightning-distill report`` calls
:func:`report_run` on a finished run folder (again, or with other rows); notebooks call either.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_distill.config.fields import PositiveInt, component
from lightning_distill.errors import UserError
from lightning_distill.eval.metrics import Described
from lightning_distill.methods.base import PhaseModel
from lightning_distill.utils.images import image_grid, to_unit
from lightning_distill.utils.files import write_atomically
from lightning_distill.config.recipe import LoadedRecipe, Recipe


@dataclass(kw_only=True)
class ModelRow:
    model: str
    """The label in the report and in ``metrics.json`` (e.g. lightning, mse)."""
    stage: str
    """The stage (or phase) whose final student is evaluated."""
    steps: PositiveInt | None = None
    """Sampling steps; default: the stage's student_steps."""


@dataclass(kw_only=True)
class TeacherRows:
    steps: list[PositiveInt] = field(default_factory=lambda: [32])
    """Rows for the teacher, one per step count."""
    guidance: float = 3.0
    """Classifier-free guidance of the teacher's samples (students sample without)."""
    unguided: bool = False
    """Also rows of the teacher without guidance (model ``teacher-unguided``), at the same step counts: guidance
    moves the teacher away from real images, so students can look better than the guided teacher on fd."""


@dataclass(kw_only=True)
class EvalConfig:
    samples: PositiveInt = 256
    """Prompts (one sample each) drawn from the data source below, with their real images as the reference."""
    data: component("data") = field(  # type: ignore[valid-type]
        default_factory=lambda: {"name": "shapes", "split": "all", "captions": "mixed"}
    )
    """Where prompts, real images and attributes come from (the first ``samples`` items)."""
    seed: int = 1234
    """Seeds the prompts and the sampling noise (the same for every model)."""
    teacher: TeacherRows = field(default_factory=TeacherRows)
    models: list[ModelRow] = field(default_factory=list)
    features: component("features") = field(default_factory=lambda: {"name": "shapes"})  # type: ignore[valid-type]
    metrics: list[component("metric")] = field(  # type: ignore[valid-type]
        default_factory=lambda: [{"name": n} for n in ("fd", "fd_patch", "fd_teacher", "fd_patch_teacher", "adherence",
                                                       "diversity", "diversity_per_prompt", "coverage")]
    )
    grid: PositiveInt = 16
    """Samples in each PNG grid (the first prompts)."""
    grid_zoom: PositiveInt = 3
    """Pixels per image pixel in the PNG grids (nearest neighbour), so that small images can be seen."""
    batch_size: PositiveInt = 128
    diversity_prompts: int = 16
    """Under-specified prompts (the first of the evaluated ones whose caption leaves an attribute open) sampled
    ``diversity_noises`` times each, for per-prompt metrics (``diversity_per_prompt``); 0: none."""
    diversity_noises: PositiveInt = 8
    diversity_pool: PositiveInt = 2048
    """Items of the data source whose scenes are the real reference of each prompt's open attributes."""


def _per_prompt_set(config: EvalConfig, data: Any, mentioned: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The evaluated prompts sampled several times (the first ``diversity_prompts`` that leave an attribute open),
    each sample's prompt number, and the attributes of the reference pool of real scenes."""
    if not config.diversity_prompts:
        raise UserError("evaluation: diversity_per_prompt needs several samples per prompt; set the report's "
                        "diversity_prompts above 0 or drop the metric")
    if mentioned is None:
        raise UserError("evaluation: per-prompt metrics need data whose items say which attributes the caption "
                        "names ('mentioned'); set the report's diversity_prompts: 0 or drop diversity_per_prompt")
    picked = torch.nonzero(~mentioned.bool().all(dim=1)).flatten()[: config.diversity_prompts]
    if not len(picked):
        raise UserError("evaluation: no evaluated prompt leaves an attribute open (shapes captions: mixed)")
    size = min(config.diversity_pool, len(data))
    pool = torch.stack([data[i]["attributes"] for i in range(size)])
    return picked, torch.arange(len(picked)).repeat_interleave(config.diversity_noises), pool


def _real_draws(pool: Tensor, attributes: Tensor, mentioned: Tensor, seed: int) -> Tensor:
    """Per row, the attributes of a real scene of the row's prompt, drawn from ``pool`` (real samples)."""
    g = torch.Generator().manual_seed(seed + 2)
    rows = []
    for a, m in zip(attributes, mentioned.bool()):
        agree = torch.nonzero((pool[:, m] == a[m]).all(dim=1)).flatten()
        rows.append(pool[agree[torch.randint(len(agree), (1,), generator=g)]][0] if len(agree) else a)
    return torch.stack(rows)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


@torch.no_grad()
def evaluate_run(
    run_dir: Path, recipe: Recipe, config: EvalConfig, device: torch.device | str = "cpu", writer: Any = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Sample and score every row; write the report files into ``out_dir`` (default ``run_dir``); return the
    ``metrics.json`` tree."""
    from torch.utils.data import default_collate

    from lightning_distill.codecs.base import null_conditioning, prompt_conditioning
    from lightning_distill.run_folder import RunFolder
    from lightning_distill.inference.sample import save_grid

    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    run = RunFolder(run_dir, LoadedRecipe(recipe=recipe, resolved={}))
    method = run.method()
    device = torch.device(device)
    data = config.data.build(seed=config.seed)
    if len(data) < config.samples:
        raise UserError(f"evaluation: the data source has {len(data)} items, fewer than samples={config.samples}")
    items = [data[i] for i in range(min(config.samples, len(data)))]
    batch = default_collate(items)
    real = to_unit(batch["pixels"])
    prompts: list[str] = list(batch["caption"])
    attributes = batch.get("attributes")
    mentioned = batch.get("mentioned")

    codec = recipe.codec.build().to(device)
    cond = prompt_conditioning(codec, prompts, *real.shape[-2:], device)
    null = null_conditioning(codec, *real.shape[-2:], device)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(config.seed))
    features = config.features.build().to(device)
    metrics = [(m.name, m.build()) for m in config.metrics]

    per_prompt = [(n, m) for n, m in metrics if getattr(m, "per_prompt", False)]
    groups = _per_prompt_set(config, data, mentioned) if per_prompt else None
    if groups is not None:
        picked, group_ids, pool = groups
        group_cond = {k: v[picked].repeat_interleave(config.diversity_noises, 0) for k, v in cond.items()}
        group_noise = torch.randn((len(group_ids), *real.shape[1:]), generator=torch.Generator().manual_seed(config.seed + 1))

    def sample(model: PhaseModel, steps: int, guidance: float = 0.0, noise: Tensor = noise,
               cond: dict[str, Tensor] = cond) -> Tensor:
        model.denoiser.to(device)
        out = []
        for s in _chunks(len(noise), config.batch_size):
            x = model.sample(noise[s].to(device), {k: v[s] for k, v in cond.items()}, steps, guidance, null,
                             tuple(getattr(codec, "null_keeps", ("time_ids",))))
            out.append(to_unit(codec.decode(x)))
        return torch.cat(out)

    def sample_groups(model: PhaseModel, steps: int, guidance: float = 0.0) -> Tensor | None:
        return sample(model, steps, guidance, group_noise, group_cond) if groups is not None else None

    rows: list[tuple[str, int, float, Tensor, float]] = []  # model, steps, guidance, images, seconds
    grouped: list[Tensor | None] = []  # per row, the per-prompt samples
    teacher = method.phase_model(None, None)
    teacher_rows = [("teacher", config.teacher.guidance)] + [("teacher-unguided", 0.0)] * config.teacher.unguided
    for label, guidance in teacher_rows:
        for steps in config.teacher.steps:
            start = time.perf_counter()
            images = sample(teacher, steps, guidance)
            rows.append((label, steps, guidance, images, time.perf_counter() - start))
            grouped.append(sample_groups(teacher, steps, guidance))
    for row in config.models:
        model = run.phase_model(run.pick(row.stage), method)
        steps = row.steps or model.facts.steps
        start = time.perf_counter()
        images = sample(model, steps)
        rows.append((row.model, steps, 0.0, images, time.perf_counter() - start))
        grouped.append(sample_groups(model, steps))

    described_real = features.describe(real, attributes, mentioned)
    reference = features.describe(rows[0][3], attributes, mentioned)  # the teacher at its first (most) steps
    if groups is not None:  # the real reference of each prompt: the pool's scenes; real samples: scenes drawn from it
        pool_real = Described(*(torch.empty(0),) * 3, attributes=pool)
        group_attributes, group_mentioned = attributes[picked][group_ids], mentioned[picked][group_ids]
        drawn = _real_draws(pool, group_attributes, group_mentioned, config.seed)
        real_groups = Described(*(torch.empty(0),) * 2, drawn, group_attributes, group_mentioned, groups=group_ids)

    def score(described: Described, images: Tensor | None) -> dict[str, float]:
        scores = {}
        for name, metric in metrics:
            if getattr(metric, "per_prompt", False):
                group = real_groups if images is None else features.describe(images, group_attributes, group_mentioned)
                group.groups = group_ids
                scores[name] = metric(group, pool_real, reference)
            else:
                scores[name] = metric(described, described_real, reference)
        return scores

    results = []
    for (model, steps, guidance, images, seconds), group_images in zip(rows, grouped):
        scores = score(features.describe(images, attributes, mentioned), group_images)
        results.append({"model": model, "steps": steps, "guidance": guidance, **scores, "seconds": round(seconds, 3)})
    real_scores = score(described_real, None)

    grids = out_dir / "samples"

    def zoom(images: Tensor) -> Tensor:
        return torch.nn.functional.interpolate(images[: config.grid], scale_factor=config.grid_zoom, mode="nearest")

    save_grid(zoom(real), grids / "real.png")
    for model, steps, _, images, _ in rows:
        save_grid(zoom(images), grids / f"{model}-{steps}step.png")
    instruments = run_dir / "instruments.json"
    tree = {
        "results": results,
        "discriminator": json.loads(instruments.read_text())["phases"] if instruments.is_file() else [],
        "real": real_scores,
        "samples": len(prompts),
        "prompts": prompts[: config.grid],
        "teacher_guidance": config.teacher.guidance,
    }
    write_atomically(out_dir / "metrics.json", json.dumps(tree, indent=2))
    write_atomically(out_dir / "report.md", report(tree, [name for name, _ in metrics]))
    if writer is not None:
        for r in results:
            for name, _ in metrics:
                writer.add_scalar(f"eval/{r['model']}/{name}", r[name], r["steps"])
        for model, steps, _, images, _ in rows:
            writer.add_image(f"eval/{model}-{steps}step", image_grid(images[: config.grid]), 0)
        writer.flush()
    return tree


def summary(tree: dict[str, Any], out_dir: Path) -> str:
    """What the console shows of an evaluation: a line per row and per adversarial phase."""
    width = max(len(r["model"]) for r in tree["results"])
    lines = [f"{r['model']:<{width}} {r['steps']:>3} steps  " + "  ".join(
        f"{k} {v:.3f}" for k, v in r.items() if k not in ("model", "steps", "seconds")) for r in tree["results"]]
    lines += [f"{r['phase']}: D accuracy {r['d_accuracy_warmup']} after warm-up, {r['d_accuracy_end']} at the end"
              for r in tree["discriminator"]]
    return "evaluation (" + str(Path(out_dir) / "report.md") + "):\n  " + "\n  ".join(lines)


def report_run(run_dir: Path, overrides: list[str] = (), out_dir: Path | None = None,  # type: ignore[assignment]
               device: torch.device | str | None = None) -> dict[str, Any]:
    """Evaluate a run's finished students again without training: ``lightning-distill report``.

    ``overrides`` are ``KEY=VALUE`` settings of the run's recipe under ``callbacks`` (the report's rows, prompts,
    metrics, teacher rows), e.g. ``callbacks.report.models=[{model: cond, stage: l1-cond}]``; anything else would
    describe another training and is refused. Writes ``report.md``, ``metrics.json`` and ``samples/`` into
    ``out_dir``, which is required with overrides (the run's own report stays the one its recipe describes) and
    otherwise defaults to the run folder. Every row's stage or phase must have finished. Returns the
    ``metrics.json`` tree.
    """
    from lightning_distill.config.recipe import load_recipe
    from lightning_distill.inference.sample import _device
    from lightning_distill.run_folder import RunFolder

    run = RunFolder(Path(run_dir))  # as trained; refuses a folder without recipe.yaml
    saved = run.path / "recipe.yaml"
    if overrides and out_dir is None:
        raise UserError("report: with KEY=VALUE overrides, pass --out DIR (the run's own report.md stays the one its "
                        "recipe.yaml describes)")
    out_dir = Path(out_dir or run.path)
    loaded = load_recipe(saved, list(overrides)) if overrides else run.loaded

    def training(resolved: dict[str, Any]) -> set[tuple[str, str]]:
        return set(_leaves({k: v for k, v in resolved.items() if k != "callbacks"}))

    changed = sorted(training(loaded.resolved) ^ training(run.loaded.resolved))
    if changed:
        key = changed[0][0]
        raise UserError(f"report: {key} is a setting of the training, not of the report; overrides here may change "
                        f"only callbacks (e.g. callbacks.report.models=[...]). To evaluate another training, train it "
                        f"with its own --out")
    specs = [spec for spec in loaded.recipe.callbacks if spec.name == "report"]
    if not specs:
        raise UserError(f"{saved} has no report callback; add one with an override, e.g. "
                        "'callbacks=[{name: report, models: [{model: student, stage: NAME}]}]'")
    config = specs[-1].config
    for row in config.models:  # the schedule is the run's: overrides change only callbacks
        last = [p for p in run.phases if row.stage in (p.stage, p.name)][-1]
        if not run.artifact_path(last).is_file():
            raise UserError(f"report: {row.stage!r} (row {row.model!r}) has not finished in {run.path}: its phase "
                            f"{last.name} has no result in phases/. Finish the run (train it again with the same "
                            "command), or name a finished phase")
    out_dir.mkdir(parents=True, exist_ok=True)
    tree = evaluate_run(run.path, loaded.recipe, config, device or _device(), out_dir=out_dir)
    print(summary(tree, out_dir))
    return tree


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, value) of every leaf of a resolved recipe (an empty list is a leaf)."""
    if isinstance(tree, dict):
        return [leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [leaf for i, v in enumerate(tree) for leaf in _leaves(v, f"{prefix}{i}.")] or [(prefix[:-1], "[]")]
    return [(prefix[:-1], repr(tree))]


def report(tree: dict[str, Any], names: list[str]) -> str:
    """The markdown report: the table, then one grid per row (same prompts and noise)."""
    arrow = {"fd": "↓", "fd_patch": "↓", "fd_teacher": "↓", "fd_patch_teacher": "↓", "adherence": "↑",
             "coverage": "↑", "diversity": "↑", "diversity_per_prompt": "↑", "teacher_distance": "↓"}
    head = ["model", "steps", "guidance", *[f"{n} {arrow.get(n, '')}".strip() for n in names], "sampling s"]
    lines = [
        "# Evaluation",
        "",
        f"{tree['samples']} prompts, one sample each, the same noise for every model; the teacher samples with "
        f"guidance {tree['teacher_guidance']} (and, as teacher-unguided, without), students without. fd and fd_patch "
        "are against real images of the same prompts; fd_teacher, fd_patch_teacher and coverage against the first "
        "teacher row's samples; diversity, where captions leave attributes open, is the entropy of the attributes "
        "read from the samples over that of the real scenes (1: as varied as real images; lower: modes averaged or "
        "dropped); diversity_per_prompt, for each of a few such prompts sampled from several noises, the number of "
        "distinct values of its open attributes over the number expected among as many real scenes of the prompt.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in [*tree["results"], {"model": "real images", "steps": "", "guidance": "", **tree["real"], "seconds": ""}]:
        cells = [str(r["model"]), str(r["steps"]), str(r.get("guidance", "")), *[f"{r[n]:.3f}" for n in names],
                 str(r["seconds"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += discriminator_table(tree.get("discriminator", []))
    lines += ["", "## Samples", "", "Prompts, in grid order (row by row):", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(tree["prompts"])]
    lines += ["", "real images: ![real](samples/real.png)", ""]
    for r in tree["results"]:
        name = f"{r['model']}-{r['steps']}step"
        lines += [f"**{r['model']}, {r['steps']} steps**", "", f"![{name}](samples/{name}.png)", ""]
    return "\n".join(lines)


def discriminator_table(rows: list[dict[str, Any]]) -> list[str]:
    """The adversarial phases' instruments as a markdown table (none: no lines)."""
    if not rows:
        return []

    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = ["", "## Discriminators", "",
             "Per adversarial phase: the discriminator's accuracy (teacher's samples called real, student's fake; 0.5 is "
             "chance), its pair accuracy (how often it scores the teacher's sample above the student's made from the "
             "same x_t: whether its gradient points the student towards the teacher's side, which a relativistic loss "
             "learns without any offset) and its loss over the loss's value at chance (1: it has learnt nothing, "
             "whatever the accuracies say; below 1: it tells the samples apart), each over the last fifth of its "
             "warm-up and over the last fifth of the phase, its accuracy over the pairs re-noised to the phase's "
             "lowest level alone (where a student's missing detail shows; – without discrete re-noising), and the "
             "student's mean squared distance to its teacher's target over the last fifth.", "",
             "| phase | D accuracy, end of warm-up | D accuracy, end | pair accuracy, end of warm-up | pair accuracy, end "
             "| D loss / chance, end of warm-up | D loss / chance, end | lowest level: D accuracy, end of warm-up "
             "| lowest level: D accuracy, end | student–teacher gap |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {cell(r['d_accuracy_warmup'])} | {cell(r['d_accuracy_end'])} | "
                     f"{cell(r.get('d_pair_accuracy_warmup'))} | {cell(r.get('d_pair_accuracy_end'))} | "
                     f"{cell(r.get('d_loss_ratio_warmup'))} | {cell(r.get('d_loss_ratio_end'))} | "
                     f"{cell(r.get('d_accuracy_lowest_warmup'))} | {cell(r.get('d_accuracy_lowest_end'))} | "
                     f"{cell(r['student_teacher_gap'])} |")
    return lines


def check_rows(config: EvalConfig, phases: list[Any]) -> None:
    """Each row names a stage or phase of the schedule (checked when the recipe loads)."""
    names = {p.stage for p in phases} | {p.name for p in phases}
    for row in config.models:
        if row.stage not in names:
            raise UserError(f"callbacks report: models stage {row.stage!r} is not in the schedule; "
                            f"choose one of {', '.join(sorted(names))} (a schedule cut by until trains none "
                            "after it: list the report's models for the stages it keeps)")
