"""Fabric construction: single device, DDP, or FSDP2 (``ModelParallelStrategy`` + ``fully_shard``).

Sharding follows the network: a module may define ``fsdp_units() -> list[nn.Module]`` naming the submodules
that become their own FSDP2 units (transformer blocks, res-blocks); the module itself becomes the root unit.
Frozen modules (the teacher) are sharded too and simply get no optimizer.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
from typing import Any, NoReturn

import torch

from lightning.fabric.strategies import DDPStrategy
from torch import nn

from lightning_distill.config.recipe import FabricConfig


def parallelize(module: nn.Module, device_mesh: Any, offload_frozen: bool = False) -> nn.Module:
    """FSDP2 ``parallelize_fn``: shard each ``fsdp_units()`` submodule, then the module itself.

    With ``offload_frozen``, a module with no trainable parameter (the teacher) keeps its shards in CPU memory
    and copies them to the device per unit as it runs.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh
    frozen = not any(p.requires_grad for p in module.parameters())
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload_frozen and frozen else OffloadPolicy()
    units = getattr(module, "fsdp_units", None)
    for unit in units() if units else []:
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    fully_shard(module, mesh=mesh, offload_policy=policy)
    return module


def strategy_name(config: FabricConfig) -> str:
    if config.strategy != "auto":
        return config.strategy
    return "single" if config.devices * config.num_nodes == 1 else "ddp"


def build_fabric(config: FabricConfig, callbacks: list[Any]) -> Any:
    """A Fabric for the recipe's devices, precision and strategy (not yet launched)."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    name = strategy_name(config)
    strategy: Any
    if name == "fsdp2":
        strategy = ModelParallelStrategy(
            parallelize_fn=functools.partial(parallelize, offload_frozen=config.offload_frozen),
            data_parallel_size=config.devices * config.num_nodes,
            tensor_parallel_size=1,
            save_distributed_checkpoint=config.distributed_checkpoint,
        )
    elif name == "ddp":
        strategy = DDPStrategy(start_method="popen")
    else:
        strategy = "auto"
    return Fabric(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=strategy,
        precision=config.precision,
        callbacks=callbacks,
    )


def launch(fabric: Any) -> None:
    """``fabric.launch()``, and destroy the process group at exit, while the interpreter is still whole.

    Left to interpreter finalization, gloo's worker threads can still hold tensors whose release needs the GIL,
    and the process aborts ("terminate called without an active exception") after its work is done.
    """
    fabric.launch()
    _register_destroy()


@functools.cache
def _register_destroy() -> None:
    """Register the exit handler once per process, however many runs it launches."""
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_together(fabric: Any, code: int = 0) -> NoReturn:
    """End this process of a finished multi-process script now: every rank waits for the others, the process group
    is destroyed, output is flushed, and the process exits with ``code`` without interpreter finalization.

    Destroying the process group at exit makes gloo's abort at finalization rare, not impossible; a script whose
    exit status is checked (a test's helper) exits here, where nothing is left to tear down.
    """
    fabric.barrier()
    _destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def uses_wrapper(fabric: Any) -> bool:
    """Whether set-up modules are wrapped (DDP) rather than sharded in place or left alone."""
    return isinstance(fabric.strategy, DDPStrategy)
