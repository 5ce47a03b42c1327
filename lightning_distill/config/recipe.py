"""Recipes: YAML files (OmegaConf) validated against the typed config tree before anything loads.

A recipe may ``extends:`` a base recipe (a path relative to itself, or a list of them); keys of the recipe
replace those of its bases, mappings merge, lists replace. A file's ``append:`` adds items to the end of lists of
the merged tree (``{schedule.stages: [...]}``: a base's ladder with more stages). Command-line overrides are
dot-lists (``train.batch_size=8``) applied last; an item of a list of named mappings is addressed by index or by its
``name`` (``schedule.stages.l1.phases.1.lr=1e-5``). ``imports:`` lists modules to import before components are looked up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import re
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_distill.config.fields import Min, PositiveInt, Spec, component, to_dict, validate
from lightning_distill.errors import RecipeError, UserError
from lightning_distill.config.registry import import_modules, resolve_import


ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _asset(name: str) -> str:
    """``${asset:NAME}`` in a recipe: the absolute path of ``NAME`` among the files shipped in the package."""
    path = ASSETS / name
    if not path.exists():
        shipped = sorted(str(p.relative_to(ASSETS)) for p in ASSETS.glob("*/*")) if ASSETS.is_dir() else []
        raise UserError(f"${{asset:{name}}}: no such shipped file; shipped: {', '.join(shipped) or 'none'}")
    return str(path)


if not OmegaConf.has_resolver("asset"):  # register_resolver from omegaconf 2.4 on, register_new_resolver before
    getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)("asset", lambda name: _asset(name))


@dataclass(kw_only=True)
class FabricConfig:
    """Devices, precision and parallelism; passed to ``lightning.fabric.Fabric``."""

    accelerator: Literal["cpu", "cuda", "gpu", "mps", "auto"] = "cpu"
    devices: PositiveInt = 1
    """Processes per node."""
    num_nodes: PositiveInt = 1
    strategy: Literal["auto", "single", "ddp", "fsdp2"] = "auto"
    """auto: single process for devices=1 and num_nodes=1, else ddp. fsdp2: ModelParallelStrategy + fully_shard."""
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    distributed_checkpoint: bool = True
    """fsdp2 only: write sharded checkpoints (one folder, each rank its shard) rather than one gathered file."""
    offload_frozen: bool = False
    """fsdp2 only: keep the frozen teacher's shards in CPU memory, copied to the device unit by unit as it runs."""
    meta_init: bool = False
    """fsdp2 only: only rank 0 loads weights; the other ranks build every module on the meta device, and each
    rank's shards are materialised on its device and filled from rank 0 (one copy of the models in host
    memory per run instead of one per process)."""


@dataclass(kw_only=True)
class TrainConfig:
    """What the generic loop owns: batching, accumulation, clipping, logging, checkpoints."""

    batch_size: PositiveInt = 4
    """Samples per device per micro-batch."""
    num_workers: Annotated[int, Min(0)] = 0
    grad_accum: PositiveInt = 1
    """Micro-batches per optimizer step."""
    clip_grad_norm: float | None = 1.0
    log_every: PositiveInt = 10
    checkpoint_every: PositiveInt = 100
    """Steps between checkpoints; a checkpoint is also written at the end of every phase."""
    keep_last: PositiveInt = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    preview_every: Annotated[int, Min(0)] = 0
    """Steps between sample grids; 0: only at the end of each phase."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: ``stop`` the run at once (exit 1, before the optimizer step and any
    save; the newest checkpoint stays the newest finite one), or ``skip`` that optimizer step and count it."""
    max_skipped_steps: Annotated[int, Min(0)] = 10
    """With ``on_nonfinite: skip``: the run stops once a phase has skipped more steps than this."""
    data_stream: Literal["run", "phase"] = "run"
    """run: one stream of batches through the whole run (a phase's batches depend on the lengths of the phases
    before it). phase: each phase draws its own stream, seeded by the run's seed and the phase's index: a change to
    one phase's length leaves every other phase's batches as they were (ablations and probes compare like with
    like); a resume inside a phase continues its stream."""
    compile: bool = False
    """``torch.compile`` every module of a phase in place (``nn.Module.compile``: weights and checkpoints keep
    their names). The first steps of each phase then include compilation."""


@dataclass(kw_only=True)
class Recipe:
    """A whole run."""

    imports: list[str] = field(default_factory=list)
    """Modules to import before components are looked up (unpackaged code that registers components)."""
    seed: int = 0
    out: str | None = None
    """Run folder; ``train --out`` takes precedence."""
    fabric: FabricConfig = field(default_factory=FabricConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: component("method")  # type: ignore[valid-type]
    schedule: component("schedule")  # type: ignore[valid-type]
    data: component("data")  # type: ignore[valid-type]
    codec: component("codec") = field(default_factory=lambda: {"name": "identity"})  # type: ignore[valid-type]
    optimizer: component("optimizer") = field(default_factory=lambda: {"name": "adam"})  # type: ignore[valid-type]
    callbacks: list[component("callback")] = field(  # type: ignore[valid-type]
        default_factory=lambda: [{"name": "tensorboard"}, {"name": "progress"}]
    )


@dataclass
class LoadedRecipe:
    recipe: Recipe
    resolved: dict[str, Any]
    """The merged, interpolated tree (what ``validate`` prints and the run folder keeps)."""


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, dict[str, Any]]]:
    """The file and its bases as ``[(label, tree), ...]``, bases first."""
    if path in chain:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise RecipeError(f"extends forms a loop: {loop}", source=str(path))
    where = f" (extended by {chain[-1]})" if chain else ""
    if path.is_dir():
        raise UserError(f"recipe {path}{where} is a folder; give one of the YAML files in it")
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}{where}")
    try:
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise RecipeError(f"not valid YAML: {err}", source=str(path)) from err
    except UnicodeDecodeError as err:
        raise RecipeError(f"not a text file (a recipe is UTF-8 YAML): {err.reason} at byte {err.start}",
                          source=str(path)) from err
    except OSError as err:
        raise UserError(f"cannot read recipe {path}{where}: {err.strerror or err}") from err
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError("a recipe must be a mapping of sections at the top level", source=str(path))
    bases = tree.pop("extends", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError("expected a path or a list of paths", path="extends", source=str(path))
    layers: list[tuple[str, dict[str, Any]]] = []
    for base in bases:
        try:
            base_path = (path.parent / str(base)).resolve()
        except (OSError, RuntimeError) as err:
            raise RecipeError(f"extends: cannot read {base}: {err}", source=str(path)) from err
        layers += _read_yaml(base_path, (*chain, path))
    layers.append((str(path), tree))
    return layers


def _parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``KEY=VALUE`` items as ``(dotted key, YAML value)``; list items are addressed by index (``a.0.b``) or, in
    a list of mappings, by their ``name`` (resolved against the merged recipe by :func:`_walk`)."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = re.sub(r"\[(\d+)\]", r".\1", key.strip())
        try:
            item.encode()
        except UnicodeEncodeError as err:  # bytes the shell passed that are not UTF-8
            raise UserError(f"bad override {item!r}: not UTF-8 text ({err.reason} at character {err.start})") from err
        if not sep or not key or not all(part for part in key.split(".")):
            raise UserError(f"bad override {item!r}: write KEY=VALUE with a dotted key, e.g. train.batch_size=8")
        try:
            # OmegaConf's own value grammar: 1e-6 is a float, [a, b] a list, ${x} an interpolation
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]  # type: ignore[index]
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise UserError(f"bad override {item!r}: the value is not valid YAML ({err})") from err
        parsed.append((key, value))
    return parsed


def _file_overrides(tree: dict[str, Any], label: str) -> list[tuple[str, Any]]:
    """A file's ``overrides:`` (taken out of its tree): ``KEY=VALUE`` strings as on the command line, applied after
    every file has merged (a stage of a base recipe changed by name, where a list would replace the whole)."""
    items = tree.pop("overrides", None)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise RecipeError("expected a list of KEY=VALUE strings, as on the command line "
                          "(e.g. [schedule.stages.l1.phases.0.steps=150])", path="overrides", source=label)
    try:
        return _parse_overrides(items)
    except UserError as err:
        raise RecipeError(str(err), path="overrides", source=label) from err


@dataclass(frozen=True)
class _Append:
    """Items a file's ``append:`` adds to the end of a list of the merged tree; ``start``, once applied: the index
    of the first (the file set the items from there on, not those before)."""

    items: list[Any]
    start: int | None = None


def _sets(key: str, value: Any, target: str) -> bool:
    """Whether an update of ``key`` (resolved) to ``value`` set ``target`` or a section above it."""
    if isinstance(value, _Append) and value.start is not None:
        index = target.removeprefix(key + ".").split(".")[0] if target.startswith(key + ".") else ""
        return index.isdigit() and int(index) >= value.start
    return target == key or target.startswith(key + ".")


def _file_appends(tree: dict[str, Any], label: str) -> list[tuple[str, Any]]:
    """A file's ``append:`` (taken out of its tree): ``{dotted key: [items]}``, each list of the merged tree (keys as in
    overrides, items of named lists by name) extended by the items, after every file has merged."""
    items = tree.pop("append", None)
    if items is None:
        return []
    if not isinstance(items, dict) or not all(isinstance(v, list) for v in items.values()):
        raise RecipeError("expected a mapping of dotted keys to lists of items to add "
                          "(e.g. {schedule.stages: [{name: s2, ...}]})", path="append", source=label)
    return [(re.sub(r"\[(\d+)\]", r".\1", str(key).strip()), _Append(value)) for key, value in items.items()]


def _walk(tree: Any, key: str, *, names: bool = False) -> tuple[list[str], Any, int]:
    """Follow a dotted key (``a.b.0.c`` or ``a.b[0].c``) through mappings and lists (plain or OmegaConf): its parts,
    the deepest node reached and how many parts led there (all of them: the key exists). With ``names``, a part that
    is not an index names an item of a list of mappings by its ``name`` (``schedule.stages.l1`` for the stage named
    l1) and is replaced in the parts by the item's index; a name that is not there, or not once, is a UserError."""
    parts, node = key.replace("[", ".").replace("]", "").split("."), tree
    for i, part in enumerate(parts):
        if isinstance(node, Mapping):
            if part not in node:
                return parts, node, i
        elif isinstance(node, Sequence) and not isinstance(node, str):
            if not part.isdigit():
                if not names:
                    return parts, node, i
                part = parts[i] = str(_item_named(node, part, ".".join(parts[:i]), key))
            if int(part) >= len(node):
                return parts, node, i
            part = int(part)  # type: ignore[assignment]
        else:
            return parts, node, i
        node = node[part]
    return parts, node, len(parts)


def _item_named(items: Sequence[Any], name: str, where: str, key: str) -> int:
    found = [item.get("name") if isinstance(item, Mapping) else None for item in items]
    if found.count(name) != 1:
        known = ", ".join(repr(n) for n in found if n is not None) or "none: address its items by index"
        problem = f"has several items named {name!r}; address it by index" if found.count(name) else \
            f"has no item named {name!r} (names: {known})"
        raise UserError(f"bad override {key}: {where or 'the recipe'} {problem}")
    return found.index(name)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> LoadedRecipe:  # type: ignore[assignment]
    """Read, merge, interpolate and validate a recipe. Imports ``imports:`` modules; builds nothing."""
    try:
        resolved_path = Path(path).resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop, before Python 3.13
        raise UserError(f"cannot read recipe {path}: {err}") from err
    layers = _read_yaml(resolved_path, ())
    # (key, value, who set it): each file's own overrides (bases first), then the command line's
    updates = [(*update, label) for label, tree in layers
               for update in (*_file_appends(tree, label), *_file_overrides(tree, label))]
    updates += [(*update, "command line") for update in _parse_overrides(list(overrides))]

    def source(key: str) -> str | None:
        # Who set the key: the override that set it or a section above it (the last applied), else the layer
        # holding its deepest existing prefix (a wrong value names the file holding it; a missing or unknown key,
        # the file that wrote its section). An error about a whole section names that file and, as the other
        # possible cause, the last override (or append) applied inside the section.
        key = re.sub(r"\[(\d+)\]", r".\1", key)
        setter = next((who for k, value, who in reversed(updates) if key and _sets(k, value, key)), None)
        if setter is not None:
            return setter
        inside = next(((k, who, v) for k, v, who in reversed(updates) if key and k.startswith(key + ".")), None)
        parts = key.split(".") if key else []
        owner = layers[-1][0]
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            reached = ((label, _walk(tree, prefix)) for label, tree in reversed(layers))
            holder = next(((label, node) for label, (_, node, found) in reached if found == depth), None)
            if holder is None:
                break
            owner = holder[0]
            if not isinstance(holder[1], dict):  # lists and values replace, never merge
                break
        if inside is not None and inside[1] != owner:
            if inside[1] == "command line":
                return f"{owner} (or the {inside[1]}'s {inside[0]})"
            what = "append to" if isinstance(inside[2], _Append) else "override"
            return f"{owner} (or {inside[1]}'s {what} {inside[0]})"
        return owner

    try:
        merged = OmegaConf.merge(*(OmegaConf.create(tree) for _, tree in layers))
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or "")
        raise RecipeError(str(err).splitlines()[0], path=key, source=source(key)) from err
    for n, (key, value, who) in enumerate(updates):
        try:
            parts, node, found = _walk(merged, key, names=True)
            key = ".".join(parts)
            updates[n] = (key, value, who)  # as resolved: source() attributes an error under it to its setter
            if isinstance(value, _Append):
                if found < len(parts) or not isinstance(node, Sequence) or isinstance(node, str):
                    raise UserError(f"bad append {key}: the merged recipe has no list there")
                updates[n] = (key, _Append(value.items, start=len(node)), who)  # the items it set
                value = [*OmegaConf.to_container(node, resolve=False), *value.items]
            try:
                OmegaConf.update(merged, key, value, merge=False, force_add=True)  # a mapping replaces the section
            except (OmegaConfBaseException, TypeError, ValueError, IndexError, KeyError) as err:
                raise UserError(f"bad override {key}={value!r}: {str(err).splitlines()[0]}") from err
        except UserError as err:
            if who == "command line":
                raise
            raise RecipeError(str(err), path="append" if isinstance(updates[n][1], _Append) else "overrides",
                              source=who) from err
    try:
        resolved = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", "") or "")
        raise RecipeError(str(err).splitlines()[0], path=key, source=source(key)) from err
    assert isinstance(resolved, dict)
    imports = resolved.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
        raise RecipeError("expected a list of module names", path="imports", source=source("imports"))
    imports = [resolve_import(m, resolved_path.parent) for m in imports]  # beside the recipe: recorded absolute
    if imports:
        resolved["imports"] = imports
    import_modules(imports)
    recipe = validate(resolved, Recipe, source=source)
    for flag in ("offload_frozen", "meta_init"):
        if getattr(recipe.fabric, flag) and recipe.fabric.strategy != "fsdp2":
            raise RecipeError(f"{flag} needs strategy: fsdp2", path=f"fabric.{flag}", source=source("fabric"))
    section = "schedule"
    try:  # cross-checks between keys, named by the file (or override) that wrote their section
        phases = recipe.schedule.build().phases()  # the schedule is pure: its mistakes surface here, before any model loads
        for section, spec in (("method", recipe.method), *(("callbacks", c) for c in recipe.callbacks)):
            check = getattr(spec.component(), "check", None)  # components' own cross-checks against the schedule
            if check is not None:
                check(spec.config, phases)
    except RecipeError:
        raise
    except UserError as err:
        raise RecipeError(str(err), source=source(section)) from err
    return LoadedRecipe(recipe=recipe, resolved=to_dict(recipe))


def dump_recipe(tree: dict[str, Any]) -> str:
    return yaml.safe_dump(tree, sort_keys=False)


__all__ = ["FabricConfig", "LoadedRecipe", "Recipe", "Spec", "TrainConfig", "dump_recipe", "load_recipe"]
