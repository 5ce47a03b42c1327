"""What a computation costs, op by op, on the meta device (sizes without memory): live bytes and FLOPs.

- :class:`Meter` counts the bytes of every storage an op creates, from that op until the storage is freed
  (autograd's saved tensors hold storages too), keeps the peak, and counts FLOPs with the formulas of
  ``torch.utils.flop_counter`` (as ``benchmarks/step.py`` does), in one dispatch mode.
- :func:`fused_attention`: attention as the fused kernel a GPU runs, not the math path meta would take.
- :class:`Autocast`: ``torch.autocast`` as it behaves on a GPU, for modules held on meta (where autocast does not
  apply): matmul-like ops in the compute dtype, normalisations in float32, casts of trained weights cached.
- :func:`replay_no_grad_calls`: a module's calls without autograd, measured once per input shape and replayed
  (the teacher's solver steps: on meta, equal shapes cost equal bytes and FLOPs).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _flash_cpu(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _flash_cpu_backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_val: Any = None,
                        **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    **flop_registry,
    # the fused CPU kernel :func:`fused_attention` runs on meta: the same FLOPs as flash attention on a GPU
    aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward,
}


@functools.lru_cache(maxsize=None)
def _fresh_returns(func: Any) -> tuple[bool, ...]:
    """Per return of an op, whether it is new memory (not a view of, or written into, an argument)."""
    return tuple(r.alias_info is None for r in func._schema.returns)


class Meter(TorchDispatchMode):
    """Bytes of the storages ops create while it is active (alive now, and their peak) and the FLOPs of those ops.

    A storage counts from the op that creates it until it is freed (a finalizer on the storage itself, so a tensor
    autograd saved keeps it counted). Views and in-place results add nothing; tensors made before (weights,
    optimizer state) are not counted. ``peak`` may be reset between parts of a computation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self.flops = 0
        self._live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.now -= nbytes

    def count(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage as new memory (once)."""
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live.add(key)
        self.now += nbytes
        weakref.finalize(storage, self._free, key, nbytes)
        if self.now > self.peak:
            self.peak = self.now

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        fresh = _fresh_returns(func)
        key = _op_key(func, args, kwargs) if all(fresh) else None
        known = _OPS.get(key) if key is not None else None
        if known is not None:  # an op seen before on meta inputs of the same layout: its outputs, made anew
            out, flops, rise = _remake(known[0]), known[1], known[2]
            self.peak = max(self.peak, self.now + rise)
        elif func._overloadpacket in _DECOMPOSED and func._can_decompose():  # linear, conv2d, matmul reach here
            start, peak, before = self.now, self.peak, self.flops  # whole in inference mode: their parts, as
            self.peak = start  # autograd would have seen them, are what run and what is counted (their FLOPs)
            with self:
                out = func.decompose(*args, **kwargs)
            if out is NotImplemented:
                self.peak = max(peak, self.peak)
            else:  # (an op that may hand back an input, as dropout does in eval mode, is not remade)
                layout = _layout(out) if key is not None and not _returns_an_input(out, args, kwargs) else None
                if layout is not None:
                    _OPS[key] = (layout, self.flops - before, self.peak - start)
                self.peak = max(peak, self.peak)
                return out
        if known is None:
            out = func(*args, **kwargs)
            formula = FLOP_FORMULAS.get(func._overloadpacket)
            flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
            if key is not None and not _returns_an_input(out, args, kwargs):
                layout = _layout(out)
                if layout is not None:
                    _OPS[key] = (layout, flops, 0)
        self.flops += flops
        if isinstance(out, torch.Tensor):
            if fresh and fresh[0]:
                self.count(out)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                if i < len(fresh) and not fresh[i]:
                    continue
                for t in (o if isinstance(o, (tuple, list)) else (o,)):
                    if isinstance(t, torch.Tensor):
                        self.count(t)
        return out


_DECOMPOSED = {aten.linear, aten.bilinear, aten.matmul, aten.einsum, aten.conv1d, aten.conv2d, aten.conv3d,
               aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d, aten.scaled_dot_product_attention,
               aten._scaled_dot_product_attention_math}
"""Composite ops with no FLOP formula of their own whose parts have one."""

# Meta kernels are mostly Python (torch._refs), the planner's cost; an op's outputs on meta depend only on the
# layouts of its inputs and its other arguments, so each is run once per such key and its outputs remade after.
_OPS: dict[Any, tuple[Any, int, int]] = {}
"""Op and argument layouts -> (output layout, FLOPs, bytes its parts rose above the output while it ran)."""
_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _arg_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta":
            raise _Uncacheable
        return (tuple(x.shape), x.stride(), x.dtype, x.storage_offset())
    if isinstance(x, (list, tuple)):
        return tuple(_arg_key(v) for v in x)
    if isinstance(x, _SCALARS):
        return (type(x), x)
    raise _Uncacheable


class _Uncacheable(Exception):
    pass


def _op_key(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    try:
        return func, _arg_key(args), tuple((k, _arg_key(v)) for k, v in kwargs.items())
    except _Uncacheable:
        return None


def _layout(out: Any) -> Any:
    """What remakes ``out``: per tensor its shape, strides and dtype (None: not remade so, e.g. off meta)."""
    if isinstance(out, torch.Tensor):
        if out.device.type != "meta" or out.storage_offset() != 0 or \
                out.untyped_storage().nbytes() != _extent(out) * out.element_size():
            return None
        return (tuple(out.shape), out.stride(), out.dtype)
    if isinstance(out, (tuple, list)):
        parts = [_layout(o) if o is not None else ("none",) for o in out]
        return None if any(p is None for p in parts) else (type(out), parts)
    return None


def _storages(x: Any) -> set[int]:
    return {t.untyped_storage()._cdata for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)}


def _returns_an_input(out: Any, args: Any, kwargs: Any) -> bool:
    return bool(_storages(out) & _storages((args, kwargs)))


def _extent(t: torch.Tensor) -> int:
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0


def _remake(layout: Any) -> Any:
    if layout[0] is tuple or layout[0] is list:
        return layout[0](_remake(p) for p in layout[1])
    if layout == ("none",):
        return None
    shape, stride, dtype = layout
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


@contextmanager
def fused_attention(dtype: torch.dtype | None = None) -> Iterator[None]:
    """``scaled_dot_product_attention`` on the meta device as the fused kernel a GPU runs (flash attention keeps
    the output and a log-sum-exp for backward, no score matrix), rather than the math path meta would take;
    in ``dtype`` when given (autocast runs attention in the compute dtype).
    Replaced on ``torch.nn.functional`` itself, so that recomputation in backward (gradient checkpointing, on the
    autograd engine's thread) takes the same path."""
    real = F.scaled_dot_product_attention

    def fused(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, **kwargs: Any) -> Any:
        # e.g. enable_gqa, or a math-only context (the gradient penalties' double backward): the real function,
        # which on meta takes the math path the GPU then runs too
        if query.device.type != "meta" or any(kwargs.values()) or not torch.backends.cuda.flash_sdp_enabled():
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kwargs)
        if dtype is not None and query.dtype == torch.float32:
            query, key, value = (x.to(dtype) for x in (query, key, value))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


class Autocast:
    """``torch.autocast(dtype)`` as a GPU runs it, for modules on meta: the functional forms of linear layers and
    convolutions take their floating inputs in ``dtype``, group and layer norms and the MSE loss in float32
    (``device_type="cpu"``: as CPU autocast runs them, norms in ``dtype``).
    A trained weight (a leaf that requires grad) is cast once per :meth:`region` and the copy reused, as
    autocast's cache does; autograd keeps the copies it saves, so they cost what they cost on a GPU.

    The functions are replaced on ``torch.nn.functional`` while :meth:`patched` is entered, so recomputation in
    backward (gradient checkpointing) casts too. Matmuls written as ``@`` are not cast (diffusers' layers use
    ``F.linear``, convolutions and ``F.scaled_dot_product_attention``).
    """

    LOW = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
    FLOAT32 = {"cuda": ("group_norm", "layer_norm", "mse_loss"), "cpu": ("mse_loss",)}
    """Per device type, the functions autocast runs in float32 (on a CPU, norms stay in the compute dtype)."""

    def __init__(self, dtype: torch.dtype, device_type: str = "cuda") -> None:
        self.dtype = dtype
        self.float32 = self.FLOAT32[device_type]
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _cast(self, x: Any, dtype: torch.dtype) -> Any:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if self._cache is not None and x.is_leaf and x.requires_grad and torch.is_grad_enabled():
            hit = self._cache.get(id(x))
            if hit is None:
                hit = self._cache[id(x)] = (x, x.to(dtype))  # the source kept, so its id is not reused
            return hit[1]
        return x.to(dtype)

    def _wrap(self, real: Callable[..., Any], dtype: torch.dtype) -> Callable[..., Any]:
        def cast(*args: Any, **kwargs: Any) -> Any:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
            return real(*args, **kwargs)

        return cast

    @contextmanager
    def patched(self) -> Iterator[None]:
        real = {name: getattr(F, name) for name in (*self.LOW, *self.float32)}
        for name, fn in real.items():
            setattr(F, name, self._wrap(fn, self.dtype if name in self.LOW else torch.float32))
        try:
            with fused_attention(self.dtype):
                yield
        finally:
            for name, fn in real.items():
                setattr(F, name, fn)

    @contextmanager
    def region(self) -> Iterator[None]:
        """One ``with fabric.autocast():`` block: casts of trained weights cached until it ends."""
        self._cache = {}
        try:
            yield
        finally:
            self._cache = None


def _signature(value: Any) -> Any:
    leaves, spec = tree_flatten(value)
    return spec, tuple((tuple(x.shape), x.dtype, x.requires_grad) if isinstance(x, torch.Tensor) else repr(x)
                       for x in leaves)


def module_signature(module: nn.Module) -> Any:
    """What a module's calls depend on, on meta: its class and its parameters' names, shapes and dtypes."""
    return type(module).__qualname__, tuple((n, tuple(p.shape), p.dtype) for n, p in module.named_parameters())


@contextmanager
def replay_no_grad_calls(modules: list[nn.Module], meter: Meter, seen: dict[Any, Any] | None = None,
                         tally: dict[int, tuple[int, int]] | None = None) -> Iterator[None]:
    """Calls of ``modules`` made without autograd, measured once per module signature and input signature
    (shapes, dtypes, other arguments) and replayed after: the same FLOPs and the same rise above the bytes alive
    at the call, and new outputs of the same shapes. Exact on meta, where shapes are all a call depends on.
    ``seen``: the measurements, to share them between modules built anew (the phases of a recipe); ``tally``:
    FLOPs and number of these calls so far, by ``id`` of the module."""
    seen = {} if seen is None else seen
    tally = {} if tally is None else tally

    def wrap(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        name = module_signature(module)

        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return forward(*args, **kwargs)
            key = (name, _signature((args, kwargs)))
            if key in seen:
                flops, rise, spec, shapes = seen[key]
                meter.flops += flops
                tally[id(module)] = tally.get(id(module), (0, 0))[0] + flops, tally.get(id(module), (0, 0))[1] + 1
                meter.peak = max(meter.peak, meter.now + rise)
                leaves = [torch.empty(s, dtype=d, device="meta") if d is not None else s for s, d in shapes]
                return tree_unflatten(leaves, spec)
            start, peak, flops = meter.now, meter.peak, meter.flops
            meter.peak = start
            out = forward(*args, **kwargs)
            leaves, spec = tree_flatten(out)
            shapes = [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else (x, None) for x in leaves]
            seen[key] = (meter.flops - flops, meter.peak - start, spec, shapes)
            tally[id(module)] = (tally.get(id(module), (0, 0))[0] + meter.flops - flops,
                                 tally.get(id(module), (0, 0))[1] + 1)
            meter.peak = max(peak, meter.peak)
            return out

        return call

    own = [(m, m.__dict__.get("forward")) for m in modules]  # an instance's own forward, if it has one
    for module in modules:
        module.forward = wrap(module, module.forward)
    try:
        yield
    finally:
        for module, forward in own:
            if forward is None:
                del module.forward
            else:
                module.forward = forward
