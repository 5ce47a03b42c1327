"""The ``lightning-distill`` CLI with one fault injected at a chosen write (``benchmarks/faults.py`` runs it).

A *write event* is a call of ``torch.save``, safetensors' ``save_file``, ``os.replace``/``os.rename``/``Path.rename``
or ``Path.write_text``/``write_bytes``: every file the CLI writes goes through one of them (checkpoints, phase
results, exports, cache shards, manifests). ``$LD_FAULT`` chooses what happens at the K-th event of a process:

    LD_FAULT=count LD_FAULT_LOG=FILE   count the events; each process appends its count to FILE at exit
    LD_FAULT=kill:K                    SIGKILL every process of the run (its process group) before event K
    LD_FAULT=kill-after:K              the same, just after event K completes
    LD_FAULT=enospc:K                  data write K (renames not counted: they take no space) raises
                                       OSError(ENOSPC), as a full disk does
    LD_FAULT=count-data                count the data writes alone

    LD_FAULT=kill:12 python benchmarks/inject.py train recipes/debug.yaml --out runs/x

It is a script (not ``python -c``) so that the processes Fabric launches for more devices run it too.
"""

from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
from pathlib import Path


def install(spec: str) -> None:
    """Wrap every write function so that event K does what ``spec`` says."""
    import safetensors.torch
    import torch

    import lightning_distill.cli  # noqa: F401  (the modules that import save_file by name, loaded before wrapping)
    import lightning_distill.data.cache  # noqa: F401
    import lightning_distill.engine.artifacts  # noqa: F401
    import lightning_distill.export.diffusers  # noqa: F401
    import lightning_distill.export.lora  # noqa: F401

    mode, _, at = spec.partition(":")
    target = int(at or 0)
    count = 0

    data_only = mode in ("enospc", "count-data")

    def wrap(fn, writes_data: bool = True):
        def wrapped(*args, **kwargs):
            nonlocal count
            if data_only and not writes_data:
                return fn(*args, **kwargs)
            count += 1
            if count == target and mode == "kill":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            if count == target and mode == "enospc":
                name = next((str(a) for a in args if isinstance(a, (str, os.PathLike))), None)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
            result = fn(*args, **kwargs)
            if count == target and mode == "kill-after":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return result

        wrapped.__wrapped__ = fn
        return wrapped

    torch.save = wrap(torch.save)
    os.replace, os.rename = wrap(os.replace, False), wrap(os.rename, False)
    Path.rename = wrap(Path.rename, False)
    Path.write_text, Path.write_bytes = wrap(Path.write_text), wrap(Path.write_bytes)
    real_save_file = safetensors.torch.save_file
    safetensors.torch.save_file = wrapped_save_file = wrap(real_save_file)
    for name, module in list(sys.modules.items()):  # `from safetensors.torch import save_file` in our modules
        if name.startswith("lightning_distill") and getattr(module, "save_file", None) is real_save_file:
            module.save_file = wrapped_save_file

    if mode.startswith("count"):
        log = os.environ["LD_FAULT_LOG"]
        atexit.register(lambda: Path(log).open("a").write(f"{count}\n"))


if __name__ == "__main__":
    if os.environ.get("LD_FAULT"):
        install(os.environ["LD_FAULT"])
    from lightning_distill.cli import main

    sys.exit(main(sys.argv[1:]))
