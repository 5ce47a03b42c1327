"""Dtype names of recipes, and state-dict key prefixes."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed (the others are dropped)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
