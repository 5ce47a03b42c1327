"""Live tensor bytes of a computation, tracked op by op (works on the meta device: sizes without memory)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while it is active, alive at each moment, and their peak.

    A storage counts from the op that makes it until nothing holds it any more (autograd's saved tensors hold it
    too: ``StorageWeakRef`` watches the storage itself, not its Python tensor). Views share their base's storage
    and add nothing. Tensors made before entering (weights, optimizer state) are not counted.

    Args:
        sweep_every: ops between checks for freed storages (a new storage is counted at once, so the peak can be
            over-stated by what the last few ops freed; 1: exact, slower). A new peak is confirmed by a check
            only once it exceeds the last by 1 %, so the peak may be under-stated by up to 1 %.
    """

    def __init__(self, sweep_every: int = 64) -> None:
        super().__init__()
        self.live: dict[int, tuple[Any, int]] = {}
        self.now = 0
        self.peak = 0
        self.sweep_every = sweep_every
        self.margin = 0
        self._ops = 0

    def sweep(self) -> int:
        """Forget the storages freed since the last check; return the bytes alive now."""
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.now -= self.live.pop(k)[1]
        return self.now

    def reset_peak(self) -> None:
        self.peak = self.sweep()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._ops += 1
        if self._ops % self.sweep_every == 0:
            self.sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        if self.now > self.peak + self.margin:  # only a sweep tells whether this is a real peak
            self.peak = max(self.peak, self.sweep())
            self.margin = self.peak // 100
        return out


@contextmanager
def fused_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on the meta device as the fused kernel a GPU runs (flash attention keeps
    the output and a log-sum-exp for backward, no score matrix), rather than the math path meta would take.
    Replaced on ``torch.nn.functional`` itself, so that recomputation in backward (gradient checkpointing, on the
    autograd engine's thread) takes the same path."""
    real = F.scaled_dot_product_attention

    def fused(q: Any, k: Any, v: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None, **kwargs: Any) -> Any:
        if q.device.type != "meta" or kwargs:
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
