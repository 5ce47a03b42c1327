"""What the tests share: paths, running the CLI as a user would, and comparisons of run folders.

Tests import these from here (``tests/`` is on pytest's path), never from another test file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve().parent / "helpers"
DEBUG_RECIPE = ROOT / "recipes" / "debug.yaml"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lightning_distill ARGS`` in its own process, as a user would run it.

    The process is forked from a server that has already imported the heavy libraries (torch, Lightning,
    transformers, diffusers: about 6 s of every fresh start on 2 cores), then runs the package's ``__main__`` as
    ``python -m`` does, with its own environment, working folder, stdin, stdout and stderr. Our own modules and
    the plugins are imported afresh in every process. ``env`` that changes anything other than our ``LD_*``
    variables (read at run time, never at import) gets a fresh interpreter instead, as does every call with
    ``LD_TESTS_FRESH_PROCESSES=1`` set.
    """
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    fresh = os.environ.get("LD_TESTS_FRESH_PROCESSES") == "1" or any(not k.startswith("LD_") for k in env or {})
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "lightning_distill", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=ROOT,
        )
    return _run_forked(list(args), full_env, timeout)


# Imported once by the fork server; what a training, export or family test imports anyway.
_PRELOAD = [
    "torch", "torch._dynamo", "lightning.fabric", "transformers", "diffusers", "diffusers.models.modeling_utils",
    "diffusers.models.unets.unet_2d_condition", "peft", "omegaconf", "safetensors.torch", "numpy", "PIL.Image",
    "tqdm", "torch.utils.tensorboard",
]
_FORKSERVER = None


def _run_forked(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    global _FORKSERVER
    import multiprocessing
    import tempfile

    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(_PRELOAD)
    command = [sys.executable, "-m", "lightning_distill", *args]
    with tempfile.TemporaryDirectory() as scratch:
        out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
        process = _FORKSERVER.Process(target=_cli_process, args=(args, env, str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(command, timeout, _read(out), _read(err))
        return subprocess.CompletedProcess(command, process.exitcode, _read(out), _read(err))


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _cli_process(args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """The forked process: ``python -m lightning_distill ARGS``, down to the exit code and the exit handlers."""
    import atexit
    import runpy
    import threading
    import traceback

    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT), (2, err, os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.environ.clear()
    os.environ.update(env)
    sys.path[:0] = [str(ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    os.chdir(ROOT)
    sys.argv = [str(ROOT / "lightning_distill" / "__main__.py"), *args]
    try:
        runpy.run_module("lightning_distill", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code
    except BaseException:  # noqa: BLE001 - as the interpreter does: the traceback, then exit 1
        traceback.print_exc()
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show a command changed nothing)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Resumable runs use the test's kill callback (off unless $LD_KILL_AT_STEP is set), so both runs share a recipe.
KILLABLE = ["imports=[killer]", "callbacks=[{name: kill_at_env}, {name: tensorboard}]", "train.checkpoint_every=4"]


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every phase artifact of a run folder, by file name."""
    return {p.name: load_file(str(p)) for p in sorted((out / "phases").glob("*.safetensors"))}


def assert_same_weights(a: dict, b: dict) -> None:
    """Two runs' phase artifacts are bit-identical."""
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}:{k} differs"


def fast_overrides(loaded, tiny_sdxl, lr=None, steps=1):
    """The SDXL recipe's structure, sized for a CPU: tiny models, one step per phase, small heads and ranks."""
    args = [f"codec.pretrained={tiny_sdxl['pipeline']}", f"method.teacher.pretrained={tiny_sdxl['pipeline']}",
            f"data.root={tiny_sdxl['images']}", "data.resolution=16", "fabric.accelerator=cpu", "fabric.devices=1",
            "fabric.strategy=auto", "fabric.precision=32-true", "train.batch_size=2", "train.preview_every=0",
            "method.teacher.dtype=float32", "method.student.gradient_checkpointing=false",
            "method.discriminator.head.channels=32", "method.discriminator.head.blocks=1", "train.checkpoint_every=1000",
            "method.preview_size=2"]
    for i, stage in enumerate(loaded["schedule"]["stages"]):
        for j, phase in enumerate(stage["phases"]):
            args.append(f"schedule.stages.{i}.phases.{j}.steps={steps}")
            if lr is not None:
                args.append(f"schedule.stages.{i}.phases.{j}.lr={lr}")
            if phase["adapter"]["name"] == "lora":
                args.append(f"schedule.stages.{i}.phases.{j}.adapter.rank=4")
    return args
