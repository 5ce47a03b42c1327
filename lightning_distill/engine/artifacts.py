"""Phase artifacts: the full state dicts a finished phase hands to later ones, one safetensors file each, with
its size and SHA-256 beside it (``NN-NAME.safetensors.json``): a file damaged since it was written is found
before it is used, and a resume takes a checkpoint from before that phase ended to write it again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_distill.errors import Diverged, UserError
from lightning_distill.methods.base import PhaseFacts
from lightning_distill.utils.files import digest, find_damage, publish, write_atomically


def artifact_path(root: Path, phase_index: int, phase_name: str) -> Path:
    """Where phase ``phase_index`` leaves its artifact under ``root`` (a run's ``phases/`` folder)."""
    return Path(root) / f"{phase_index:02d}-{phase_name}.safetensors"


def digest_path(path: Path) -> Path:
    """Where the size and SHA-256 of artifact ``path`` are recorded."""
    return path.with_name(path.name + ".json")


def artifact_damage(path: Path, full: bool = True) -> str | None:
    """What is wrong with artifact ``path`` (missing, cut short, or, with ``full``, changed), or None. Artifacts
    written before digests were recorded are taken as they are."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    recorded = digest_path(path)
    if not recorded.is_file():
        return None
    try:
        want = json.loads(recorded.read_text())
    except (OSError, ValueError) as err:
        return f"{recorded} cannot be read ({err})"
    if not full:
        size = path.stat().st_size
        return None if size == want["size"] else f"{path} has {size} bytes, {want['size']} were written"
    return find_damage(path.parent, {path.name: want})


def load_artifact(path: Path) -> dict[str, Tensor]:
    """An artifact's tensors, verified against the digest recorded when it was written."""
    problem = artifact_damage(path)
    if problem:
        raise UserError(f"phase result damaged: {problem}. Restore it from a copy, or train that phase again by "
                        "moving away the checkpoints written after it began and running the same command")
    return load_file(str(path))


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """All of a module's weights, gathered to full tensors on CPU (sharded or not); every rank calls this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = getattr(module, "_original_module", module)  # a Fabric wrapper
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(module, options=options)
    else:
        state = module.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


class Artifacts:
    """What finished phases hand to later ones: ``phases/NN-NAME.safetensors``, written atomically by rank 0."""

    def __init__(self, root: Path, fabric: Any, names: dict[int, str]) -> None:
        self.root = Path(root)
        self.fabric = fabric
        self.names = names

    def path(self, index: int) -> Path:
        return artifact_path(self.root, index, self.names[index])

    def save(self, index: int, states: dict[str, dict[str, Tensor]], facts: PhaseFacts | None = None) -> None:
        """Write phase ``index``'s state dicts (keys ``NAME.KEY``), with ``facts`` in the file's metadata."""
        flat = {f"{name}.{k}": v.contiguous() for name, state in states.items() for k, v in state.items()}
        bad = [k for k, v in flat.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # every rank holds the full tensors, so every rank raises here, before anything is written
            raise Diverged(f"phase {self.names[index]!r}: its result holds non-finite values ({len(bad)} tensors, "
                           f"first {bad[0]}); nothing was written. Lower the phase's lr, then run the same command")
        if self.fabric.is_global_zero:
            self.root.mkdir(parents=True, exist_ok=True)
            final = self.path(index)
            tmp = final.with_name(f".tmp-{final.name}")
            save_file(flat, str(tmp), metadata=facts.to_metadata() if facts else None)
            write_atomically(digest_path(final), json.dumps(digest(tmp)))
            publish(tmp, final)
        self.fabric.barrier()

    def damage(self, index: int) -> str | None:
        """What is wrong with phase ``index``'s artifact (missing or cut short; sizes only), or None."""
        return artifact_damage(self.path(index), full=False)

    def __call__(self, index: int) -> dict[str, Tensor]:
        path = self.path(index)
        if not path.is_file():
            raise UserError(f"phase {self.names[index]!r} has no saved result at {path}; was the run folder changed?")
        return load_artifact(path)
