from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def cli():
    return run_cli


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show a command changed nothing)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-shaped pipeline folder (random weights, tokenizer built here) and a folder of captioned images."""
    sys.path.insert(0, str(HELPERS))
    from tiny_sdxl import WORDS, make_pipeline

    root = tmp_path_factory.mktemp("tiny_sdxl")
    make_pipeline(root / "pipeline")
    images = root / "images"
    images.mkdir()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(6):
        size = (24 + 4 * i, 20 + 2 * i)  # not square: exercises resize and crop
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text(" ".join(rng.choice(WORDS, 5)))
    return {"pipeline": root / "pipeline", "images": images}
