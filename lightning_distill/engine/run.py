"""``train``: make the run folder, build Fabric, launch processes and call the loop."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning_distill.errors import UserError
from lightning_distill.utils.files import write_atomically
from lightning_distill.config.recipe import LoadedRecipe, dump_recipe

log = logging.getLogger(__name__)


def run_folder(loaded: LoadedRecipe, out: str | None) -> Path:
    """``--out`` if given, else the recipe's ``out``; one of them is required."""
    chosen = out or loaded.recipe.out
    if not chosen:
        raise UserError("no run folder: pass --out DIR or set 'out:' in the recipe")
    return Path(chosen).resolve()


def check_run_folder(out_dir: Path, loaded: LoadedRecipe) -> None:
    """A folder that already holds a run must hold a run of this very recipe (then training resumes)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    saved = out_dir / "recipe.yaml"
    if saved.is_file() and saved.read_text() != dump_recipe(loaded.resolved):
        import difflib

        diff = "".join(
            list(
                difflib.unified_diff(
                    saved.read_text().splitlines(True),
                    dump_recipe(loaded.resolved).splitlines(True),
                    "saved recipe.yaml",
                    "this recipe",
                )
            )[:40]
        )
        raise UserError(
            f"{out_dir} holds a run of a different recipe, so it cannot be resumed with this one. "
            f"Use another --out, or delete the folder to start over. Differences:\n{diff}"
        )


def train(loaded: LoadedRecipe, out_dir: Path) -> dict[str, float] | None:
    """Train the recipe in ``out_dir`` (resuming the run there, if any).

    Returns the last logged metrics on the main process, None on the others.
    """
    from lightning_distill.engine.distributed import build_fabric, launch
    from lightning_distill.engine.loop import fit

    recipe = loaded.recipe
    check_run_folder(out_dir, loaded)
    callbacks = [spec.build(out_dir=out_dir) for spec in recipe.callbacks]
    # the method's options may need callbacks of their own (the distillation's student EMA)
    callbacks += getattr(recipe.method.component(), "callbacks", lambda _: [])(recipe.method.config)
    fabric = build_fabric(recipe.fabric, callbacks)
    fabric.meta_init = recipe.fabric.meta_init
    launch(fabric)

    def write_recipe() -> None:  # once the data opened: a run that cannot start leaves the folder as it was
        if fabric.is_global_zero:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_atomically(out_dir / "recipe.yaml", dump_recipe(loaded.resolved))
        fabric.barrier()

    metrics = fit(fabric, recipe, out_dir, callbacks, on_start=write_recipe)
    return metrics if fabric.is_global_zero else None


def describe_components(role: str | None = None) -> str:
    """Registered components with their config fields (``lightning-distill components [ROLE]``)."""
    from lightning_distill.config.fields import describe_fields
    from lightning_distill.config.registry import REGISTRIES, loaded_plugins, load_plugins

    load_plugins()
    if role is not None and role not in REGISTRIES:
        import difflib

        close = difflib.get_close_matches(role, list(REGISTRIES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown role {role!r}.{hint} Roles: {', '.join(REGISTRIES)}")
    lines: list[str] = []
    for name, registry in REGISTRIES.items():
        if role is not None and name != role:
            continue
        lines.append(f"{name}:")
        for key, obj in registry.items():
            doc = (obj.__doc__ or "").strip().splitlines()
            lines.append(f"  {key}  ({obj.__module__})  {doc[0] if doc else ''}".rstrip())
            for field, typ, default in describe_fields(getattr(obj, "Config", None)):
                lines.append(f"      {field}: {typ} = {default!r}")
    if loaded_plugins:
        lines.append("plugins: " + ", ".join(loaded_plugins))
    return "\n".join(lines)


def set_up_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lightning", "lightning.fabric", "torch", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
