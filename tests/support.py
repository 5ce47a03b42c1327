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
    """``python -m lightning_distill ARGS`` in a fresh process, as a user would run it."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lightning_distill", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


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
