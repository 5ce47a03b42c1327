from __future__ import annotations

import sys

import pytest

from support import HELPERS, run_cli


@pytest.fixture
def cli():
    return run_cli


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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip where there is no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _tiny_family(tmp_path_factory, name: str):
    sys.path.insert(0, str(HELPERS))
    from tiny_families import MAKERS

    return MAKERS[name](tmp_path_factory.mktemp(f"tiny_{name}") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A tiny SD1.5-shaped pipeline folder (random weights; StableDiffusionPipeline loads it)."""
    return _tiny_family(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3-shaped pipeline folder (random weights; StableDiffusion3Pipeline loads it)."""
    return _tiny_family(tmp_path_factory, "sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny Flux-shaped pipeline folder (random weights; FluxPipeline loads it)."""
    return _tiny_family(tmp_path_factory, "flux")
