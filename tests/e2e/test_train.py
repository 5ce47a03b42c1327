"""End to end through the CLI: train, TensorBoard output, kill-and-resume, a kill while saving."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from support import DEBUG_RECIPE, HELPERS, KILLABLE, ROOT, assert_same_weights, final_weights

def test_debug_recipe_trains_and_logs_to_tensorboard(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = cli("train", str(DEBUG_RECIPE), "--out", str(out), "train.preview_every=3")
    assert result.returncode == 0, result.stderr
    assert "done:" in result.stdout
    assert "step/s" in result.stderr and "s4-uncond" in result.stderr  # the progress bar
    assert (out / "recipe.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000012", "step-00000014"]  # keep_last 2
    assert json.loads((out / "checkpoints" / "step-00000014" / "meta.json").read_text())["phase_name"] == "s4-uncond"
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ["s8-mse/loss/mse", "s4-cond/loss/discriminator", "s4-uncond/loss/generator", "all/grad_norm/student"]:
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [e.step for e in acc.Scalars("s8-mse/loss/mse")] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in acc.Scalars("all/loss/generator"))
    assert "s4-cond/samples" in tags["images"]


def test_mse_phase_moves_the_student_toward_the_teacher(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", str(DEBUG_RECIPE), "--out", str(out), "schedule.stages.0.phases.0.steps=30",
                 "schedule.stages.1.phases.0.steps=1", "schedule.stages.1.phases.1.steps=1", "train.log_every=1")
    assert result.returncode == 0, result.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("s8-mse/loss/mse")]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses


def test_sigkill_and_rerun_ends_bit_identical_to_an_uninterrupted_run(cli, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *KILLABLE).returncode == 0
    # step 7 lies inside the conditional adversarial phase; the newest checkpoint then is step 6 (phase end)…
    first = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *KILLABLE, env={"LD_KILL_AT_STEP": "7"})
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not (killed / "phases" / "01-s4-cond.safetensors").exists()
    second = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *KILLABLE, env={"LD_KILL_AT_STEP": "11"})
    assert second.returncode == -signal.SIGKILL  # …and again mid-phase after the step-8 checkpoint
    assert (killed / "checkpoints" / "step-00000008").is_dir()
    third = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *KILLABLE)
    assert third.returncode == 0, third.stderr
    assert_same_weights(final_weights(whole), final_weights(killed))


def test_a_phase_of_its_own_data_stream_does_not_depend_on_the_phases_before_it(cli, tmp_path):
    """``train.data_stream: phase``: with the first phase held still (lr 0), its length changes nothing in the
    phase after it; with one stream through the run (the default) it changes that phase's batches, so its result."""

    def second_phase(stream: str, steps: int) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{stream}-{steps}"
        done = cli("train", str(DEBUG_RECIPE), "--out", str(out), f"train.data_stream={stream}",
                   f"schedule.stages.0.phases.0.steps={steps}", "schedule.stages.0.phases.0.lr=0",
                   "schedule.stages.1.phases.1.steps=1")
        assert done.returncode == 0, done.stderr
        return final_weights(out)["01-s4-cond.safetensors"]

    assert_same_weights({"s4": second_phase("phase", 2)}, {"s4": second_phase("phase", 3)})
    run2, run3 = second_phase("run", 2), second_phase("run", 3)
    assert any(not torch.equal(run2[k], run3[k]) for k in run2)


def test_a_phase_of_its_own_data_stream_resumes_its_stream(cli, tmp_path):
    """Killed twice (inside the conditional phase before its step-8 checkpoint, then after it), rerun: the same
    weights as the uninterrupted run, with per-phase streams; a resume with the other setting is refused."""
    opts = [*KILLABLE, "train.data_stream=phase"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *opts).returncode == 0
    for kill_at in ("7", "11"):
        done = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *opts, env={"LD_KILL_AT_STEP": kill_at})
        assert done.returncode == -signal.SIGKILL, done.stderr
    assert (killed / "checkpoints" / "step-00000008").is_dir()  # the second kill resumed inside the phase
    other = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *KILLABLE)  # the folder's recipe differs: refused
    assert other.returncode == 2 and "-  data_stream: phase\n+  data_stream: run" in other.stderr
    assert cli("train", str(DEBUG_RECIPE), "--out", str(killed), *opts).returncode == 0
    assert_same_weights(final_weights(whole), final_weights(killed))


KILL_DURING_SAVE = r"""
import os, signal, sys, torch
from pathlib import Path
import lightning_distill.engine.checkpoint as ck
from lightning_distill.cli import main

real_save = torch.save
def dying_save(obj, f, *a, **k):
    # the second checkpoint (step 8): die after the models are written, before the rank file and the rename
    if ".tmp-step-00000008" in str(f):
        real_save(obj, f, *a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
ck.torch.save = dying_save
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path):
    out = tmp_path / "run"
    args = ["train", str(DEBUG_RECIPE), "--out", str(out), "train.checkpoint_every=4"]
    env = {"PYTHONPATH": str(HELPERS)}
    import os

    died = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})
    assert died.returncode == -signal.SIGKILL, died.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-step-00000008").is_dir()  # the half-written one
    from lightning_distill.engine.checkpoint import Checkpoints

    class _Fabric:  # enough of Fabric for reading checkpoint folders
        is_global_zero, global_rank, world_size = True, 0, 1

        def barrier(self):
            pass

    latest = Checkpoints(ckpts, _Fabric(), keep_last=2).latest()
    assert latest is not None and latest.name == "step-00000006"
    state = torch.load(latest / "state-student", weights_only=False)
    assert any(k.startswith("net.") for k in state["model"]) and state["optimizer"]["state"]
    # and the run resumes from it, cleaning the partial folder
    again = subprocess.run([sys.executable, "-m", "lightning_distill", *args], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert not (ckpts / ".tmp-step-00000008").exists()
    assert (out / "phases" / "02-s4-uncond.safetensors").is_file()


def test_gradient_accumulation_draws_accum_micro_batches_per_step(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", str(DEBUG_RECIPE), "--out", str(out), "train.grad_accum=3", "train.batch_size=2")
    assert result.returncode == 0, result.stderr
    loader = torch.load(out / "checkpoints" / "step-00000014" / "rank-0.pt", weights_only=False)["loader"]
    assert loader["_sampler_iter_state"]["samples_yielded"] == 14 * 3 * 2


@pytest.mark.slow
def test_fsdp2_bf16_accumulating_run_resumes_bit_identical(cli, tmp_path):
    """FSDP2 x 2 processes, bf16 autocast, 2 micro-batches per step, a LoRA phase: killed three times, resumed,
    same weights."""
    opts = [*KILLABLE, "fabric.devices=2", "fabric.strategy=fsdp2", "fabric.precision=bf16-mixed",
            "train.grad_accum=2", "train.batch_size=2",
            "schedule.stages.1.phases.0.adapter={name: lora, rank: 4, exclude: [conv_in, conv_out, time, text]}"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *opts).returncode == 0
    for kill_at in ("5", "11"):
        assert cli("train", str(DEBUG_RECIPE), "--out", str(killed), *opts, env={"LD_KILL_AT_STEP": kill_at}).returncode
    assert cli("train", str(DEBUG_RECIPE), "--out", str(killed), *opts).returncode == 0
    assert_same_weights(final_weights(whole), final_weights(killed))


@pytest.mark.slow
def test_fsdp2_resumes_from_a_checkpoint_where_some_parameters_have_no_optimizer_state(cli, tmp_path):
    """Step 8 is written after one student step that left some of its parameters without gradients, so without
    Adam state; sharded loading asked for state of every parameter and failed. Found by benchmarks/faults.py."""
    opts = [*KILLABLE, "fabric.devices=2", "fabric.strategy=fsdp2", "train.checkpoint_every=2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *opts).returncode == 0
    assert cli("train", str(DEBUG_RECIPE), "--out", str(killed), *opts, env={"LD_KILL_AT_STEP": "9"}).returncode
    assert sorted(p.name for p in (killed / "checkpoints").iterdir())[-1] == "step-00000008"
    again = cli("train", str(DEBUG_RECIPE), "--out", str(killed), *opts)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_weights(final_weights(whole), final_weights(killed))


@pytest.mark.slow
def test_compiled_run_matches_the_eager_one(cli, tmp_path):
    """train.compile: the same run, compiled (inductor on CPU), ends with nearly the same weights."""
    short = ["schedule.stages.0.phases.0.steps=2", "schedule.stages.1.phases.0.steps=2", "schedule.stages.1.phases.1.steps=1"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(eager), *short).returncode == 0
    result = cli("train", str(DEBUG_RECIPE), "--out", str(compiled), *short, "train.compile=true", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_weights(eager), final_weights(compiled)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.allclose(a[name][k], b[name][k], atol=1e-4), (name, k)


HASH_CODEC = '''
import torch
from lightning_distill import CODECS
from lightning_distill.codecs.base import Codec


@CODECS.register("hash_text")
class HashText(Codec):
    """Identity on latents; a caption's embedding is drawn from a generator seeded by its characters."""

    has_text = True

    def encode(self, pixels):
        return pixels

    def decode(self, latents):
        return latents

    def encode_text(self, captions, time_ids=None):
        texts = [torch.randn(4, 16, generator=torch.Generator().manual_seed(sum(map(ord, c)))) for c in captions]
        text = torch.stack(texts)
        return {"text": text, "pooled": text.mean(1)}
'''


def test_a_toy_teacher_with_a_text_codec_samples_from_prompts(cli, tmp_path):
    (tmp_path / "hash_codec.py").write_text(HASH_CODEC)
    out = tmp_path / "run"
    env = {"PYTHONPATH": str(tmp_path)}
    done = cli("train", str(DEBUG_RECIPE), "--out", str(out), "imports=[hash_codec]", "codec={name: hash_text}",
               "schedule.stages.0.phases.0.steps=2", "schedule.stages.1.phases.0.steps=1",
               "schedule.stages.1.phases.1.steps=1", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    grid = tmp_path / "grid.png"
    done = cli("sample", str(out), "--prompt", "a red circle", "--prompt", "a blue square", "--size", "8",
               "--out", str(grid), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    with Image.open(grid) as im:
        assert im.size == (2 * 9 + 1, 10)  # two 8-px samples of the 4-step student, 1-px borders
    done = cli("export", str(out), "--out", str(tmp_path / "export"), env=env)
    assert done.returncode == 2 and "a teacher loaded from a diffusers folder" in done.stderr  # toy networks: refused
