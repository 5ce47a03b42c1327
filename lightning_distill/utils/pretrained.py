"""``from_pretrained`` from a local folder or a hub id, with errors that name the folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_distill.errors import UserError


def load_pretrained(cls: Any, pretrained: str, subfolder: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with a clear error for a missing folder or an unreachable hub id."""
    local = Path(pretrained).expanduser()
    looks_local = local.exists() or pretrained.startswith((".", "/", "~"))
    if looks_local and not (local / subfolder).is_dir():
        raise UserError(f"{cls.__name__}: no folder {local / subfolder} (pretrained={pretrained!r}, subfolder={subfolder!r})")
    try:
        return cls.from_pretrained(str(local) if looks_local else pretrained, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load {cls.__name__} from {pretrained!r}/{subfolder}: {err}") from err
