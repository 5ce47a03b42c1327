"""Atomic, resumable checkpoints and phase artifacts.

A checkpoint is a folder ``checkpoints/step-00000120/`` holding ``state-NAME`` for each trained module (its
weights and optimizer through ``fabric.save``: one file, or a sharded folder under FSDP2), ``rank-K.pt`` per rank (RNG states, data-loader
state, callback states) and ``meta.json``. It is written under a temporary name and renamed into place last,
so a run killed while saving leaves the previous checkpoints intact; half-written folders are removed on the
next start. Only the newest ``keep_last`` are kept.

``meta.json`` records the size and SHA-256 of every file. A resume verifies the newest checkpoint and, if a
file was damaged since (a disk or copy fault), warns naming it and takes the newest intact one instead; the
damaged folder is left where it is (the run replaces it when it writes that step again). If none is intact,
the run stops with the folder named (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_distill.errors import UserError
from lightning_distill.utils.files import digests, find_damage, fsync_path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain data (numpy's key as a tensor), so that a checkpoint's rank
    state loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's facts, so that a changed ``meta.json`` (say, its step) is found too."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


class Checkpoints:
    """The ``checkpoints/`` folder of a run.

    Args:
        root: the folder.
        fabric: the run's Fabric (saves and loads sharded state, ranks, barriers).
        keep_last: how many complete checkpoints to keep.
    """

    def __init__(self, root: Path, fabric: Any, keep_last: int) -> None:
        self.root = Path(root)
        self.fabric = fabric
        self.keep_last = max(1, keep_last)

    def clean_partial(self) -> None:
        """Remove folders a killed save left behind."""
        if self.fabric.is_global_zero:
            for folder in (self.root, self.root.parent / "phases"):
                for tmp in folder.glob(".tmp-*") if folder.is_dir() else []:
                    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        self.fabric.barrier()

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def damage(self, path: Path) -> str | None:
        """What is wrong with checkpoint ``path`` (a file missing, cut short or changed), or None if intact.
        Checkpoints written before files were recorded are taken as they are."""
        try:
            meta = self.meta(path)
        except (OSError, ValueError) as err:
            return f"{path / 'meta.json'} cannot be read ({err})"
        if "meta_sha256" in meta and meta.pop("meta_sha256") != _meta_digest(meta):
            return f"{path / 'meta.json'} was changed since it was written (SHA-256 differs)"
        return find_damage(path, meta["files"]) if "files" in meta else None

    def latest_intact(self, usable: Callable[[Path], str | None] = lambda _: None) -> Path | None:
        """The newest checkpoint that is intact and ``usable`` (None: no reason against it), warning about each
        newer one passed over; None when there is no checkpoint. Rank 0 verifies, every rank gets its choice.

        Raises:
            UserError: there are checkpoints, but none is intact and usable.
        """
        chosen: str | None = None
        problems: list[str] = []
        if self.fabric.is_global_zero:
            for path in reversed(self.complete()):
                problem = self.damage(path) or usable(path)
                if problem is None:
                    chosen = path.name
                    break
                problems.append(problem)
                log.warning("checkpoint %s is not usable: %s; trying the one before (the folder is left as it is)",
                            path.name, problem)
        if self.fabric.world_size > 1:
            chosen, problems = self.fabric.broadcast((chosen, problems), src=0)
        if chosen is None and problems:
            raise UserError(
                f"no usable checkpoint in {self.root}: " + "; ".join(problems) + ". Restore the damaged files "
                "from a copy, or move the checkpoints folder away to train from the start"
            )
        return self.root / chosen if chosen else None

    @staticmethod
    def meta(path: Path) -> dict[str, Any]:
        return json.loads((path / "meta.json").read_text())

    def save(
        self, step: int, state: dict[str, dict[str, Any]], rank_state: dict[str, Any], meta: dict[str, Any]
    ) -> Path:
        """Write checkpoint ``step`` atomically (every rank calls this).

        Args:
            state: per trained module, ``{"model": module, "optimizer": optimizer}`` (saved one file or folder
                each: sharded checkpoints hold one model apiece).
            rank_state: this rank's own state (RNG, data loader, callbacks).
            meta: JSON-able facts (phase index and name); ``step`` and ``world_size`` are added.
        """
        fabric = self.fabric
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if fabric.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        fabric.barrier()
        for name, part in state.items():
            fabric.save(tmp / f"state-{name}", part)
        torch.save(rank_state, tmp / f"rank-{fabric.global_rank}.pt")
        fabric.barrier()
        if fabric.is_global_zero:
            names = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
            meta = {**meta, "step": step, "world_size": fabric.world_size, "files": digests(tmp, names)}
            meta["meta_sha256"] = _meta_digest(meta)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            for f in [*tmp.rglob("*"), tmp]:  # files and folders: the rename must not outrun their contents
                fsync_path(f)
            if final.exists():  # an earlier run wrote this step and was killed before moving on
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.root)
            # the newest keep_last up to this one; a newer, damaged one an earlier run left is not counted
            for old in [c for c in self.complete() if c.name <= final.name][: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        fabric.barrier()
        return final

    def load(self, path: Path, state: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Load models/optimizers into ``state`` in place; return this rank's own state."""
        meta = self.meta(path)
        if meta["world_size"] != self.fabric.world_size:
            raise UserError(
                f"checkpoint {path} was written by {meta['world_size']} processes, this run has "
                f"{self.fabric.world_size}; resume with the same devices x num_nodes"
            )
        for name, part in state.items():
            folder = path / f"state-{name}"
            if not folder.is_dir():
                self.fabric.load(folder, part)
                continue
            part, without = _match_saved_optimizer(folder, part)
            self.fabric.load(folder, part)
            for p in without:
                p.requires_grad_(True)
        return self.load_rank_state(path)

    def load_rank_state(self, path: Path) -> dict[str, Any]:
        """This rank's own state, read as tensors and plain data only: a checkpoint from elsewhere (a shared
        folder, a downloaded run) cannot run code on resume."""
        import pickle

        file = path / f"rank-{self.fabric.global_rank}.pt"
        try:
            return torch.load(file, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UserError(
                f"{file} holds more than tensors and plain data, which resuming does not unpickle (it could run "
                f"code): {str(err).splitlines()[0]}. Move {path} away to resume from an older checkpoint, or "
                "from the start"
            ) from err




def _match_saved_optimizer(folder: Path, part: dict[str, Any]) -> tuple[dict[str, Any], list[torch.nn.Parameter]]:
    """Make a fresh optimizer hold state for exactly the parameters a sharded checkpoint holds state for.

    Loading a sharded (FSDP2) checkpoint asks for the state of every parameter the optimizer has state for, and a
    fresh optimizer would first initialise all of them (torch's ``_init_optim_state``). A checkpoint holds state
    only for parameters that had received gradients (none at all when it was written before the optimizer's
    first step, e.g. in a discriminator warm-up), so that load fails on the keys it lacks. Here those parameters
    get their state by one step at learning rate 0 on zero gradients (the weights stay as they are; the loaded
    values then replace the state), and the others are returned, set not to require gradients for the load
    (which refuses trainable parameters without saved state; the caller sets them back). With no state saved,
    the model is loaded alone, the optimizer staying fresh.
    """
    from torch.distributed.checkpoint import FileSystemReader

    prefix = "optimizer.state."
    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    saved = {k[len(prefix):].rsplit(".", 1)[0] for k in keys if k.startswith(prefix)}
    optimizer = getattr(part["optimizer"], "optimizer", part["optimizer"])  # inside Fabric's wrapper
    if not saved:
        return {k: v for k, v in part.items() if k != "optimizer"}, []
    module = getattr(part["model"], "_original_module", part["model"])
    with_state = [p for name, p in module.named_parameters() if name in saved]
    without = [p for name, p in module.named_parameters() if name not in saved and p.requires_grad]
    for p in without:
        p.requires_grad_(False)
    if optimizer.state:
        return part, without
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in with_state:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    return part, without
