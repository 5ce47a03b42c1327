"""DDP and FSDP2 on CPU with 2 gloo processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from support import DEBUG_RECIPE, HELPERS, ROOT
from support import KILLABLE, assert_same_weights, fast_overrides, final_weights

FSDP2 = ["fabric.devices=2", "fabric.strategy=fsdp2"]


def test_fsdp2_checkpoint_loads_into_fresh_modules_exactly(tmp_path):
    result = subprocess.run([sys.executable, str(HELPERS / "fsdp_roundtrip.py"), str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads((tmp_path / "RESULT.json").read_text())
    assert r["world_size"] == 2 and r["param_is_dtensor"] == "DTensor"
    assert "__0_0.distcp" in r["sharded_files"] and "__1_0.distcp" in r["sharded_files"]  # one shard per rank
    assert r["optimizer_keys"] > 0 and r["differed_before_load"] > 0
    assert r["missing"] == [] and r["equal"] == r["keys"], r


@pytest.mark.slow  # about a minute on 2 cores: the default run stays under 15 minutes
def test_fsdp2_sigkill_and_resume_matches_an_uninterrupted_run(cli, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *FSDP2, *KILLABLE).returncode == 0
    first = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *FSDP2, *KILLABLE, env={"LD_KILL_AT_STEP": "11"})
    assert first.returncode != 0
    assert (killed / "checkpoints" / "step-00000008" / "state-discriminator").is_dir()  # sharded checkpoint
    second = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *FSDP2, *KILLABLE)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_same_weights(final_weights(whole), final_weights(killed))


def test_ddp_two_processes_each_draw_their_own_noise(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", str(DEBUG_RECIPE), "--out", str(out), "fabric.devices=2", "fabric.strategy=ddp",
                 "train.grad_accum=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done:") == 1  # reported once, by rank 0
    last = out / "checkpoints" / "step-00000014"
    assert json.loads((last / "meta.json").read_text())["world_size"] == 2
    r0, r1 = (torch.load(last / f"rank-{r}.pt", weights_only=False) for r in (0, 1))
    assert not torch.equal(r0["rng"]["torch"], r1["rng"]["torch"])
    # each rank read its own half of the data
    assert r0["loader"]["_sampler_iter_state"]["samples_yielded"] == 14 * 2 * 4




@pytest.mark.slow  # about a minute on 2 cores: the default run stays under 15 minutes
def test_fsdp2_teacher_offload_and_meta_init_change_no_number(cli, tmp_path):
    """Offloading the teacher, and building on the meta device everywhere but rank 0 (a LoRA phase too), give
    the very weights of the plain FSDP2 run."""
    short = ["schedule.stages.0.phases.0.steps=2", "schedule.stages.1.phases.0.steps=2", "schedule.stages.1.phases.1.steps=1",
             "schedule.stages.1.phases.1.adapter={name: lora, rank: 4, exclude: [conv_in, conv_out, time, text]}"]
    plain = tmp_path / "plain"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(plain), *FSDP2, *short).returncode == 0
    for flag in ("offload_frozen", "meta_init"):
        out = tmp_path / flag
        result = cli("train", str(DEBUG_RECIPE), "--out", str(out), *FSDP2, *short, f"fabric.{flag}=true")
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_weights(final_weights(plain), final_weights(out))


@pytest.mark.slow
def test_fsdp2_shards_an_sd3_ladder_by_transformer_block(cli, tiny_sd3, tmp_path):
    """The SD3 recipe on 2 FSDP2 processes, sharded by transformer block, with and without meta-device
    initialisation: the same final weights, and an export that loads in the SD3 pipeline's network class."""
    from diffusers import SD3Transformer2DModel

    from lightning_distill.config.recipe import load_recipe

    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a red cat")
    recipe = ROOT / "recipes" / "sd3_lightning" / "full.yaml"
    args = fast_overrides(load_recipe(recipe).resolved, {"pipeline": tiny_sd3, "images": images})
    args += [*FSDP2, "data.resolution=32", "train.batch_size=2"]
    plain, meta = tmp_path / "plain", tmp_path / "meta"
    result = cli("train", str(recipe), "--out", str(plain), *args, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert cli("train", str(recipe), "--out", str(meta), *args, "fabric.meta_init=true", timeout=1200).returncode == 0
    assert_same_weights(final_weights(plain), final_weights(meta))
    out = tmp_path / "export"
    assert cli("export", str(plain), "--format", "diffusers", "--out", str(out)).returncode == 0
    SD3Transformer2DModel.from_pretrained(str(out / "transformer"))
