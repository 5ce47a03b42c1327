"""Faults that must not lose work: a diverging run, a damaged checkpoint or phase artifact."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from support import DEBUG_RECIPE, KILLABLE, assert_same_weights, final_weights

DIVERGE = ["schedule.stages.0.phases.0.lr=1e8", "train.clip_grad_norm=null", "train.checkpoint_every=1"]
NAN = ["imports=[nan_loss]", "method.regression_loss={name: nan_at_env}", "train.checkpoint_every=1"]


def _all_finite(out):
    """Every tensor of every checkpoint and phase artifact of a run folder is finite (and there is one)."""
    files = list((out / "checkpoints").rglob("state-*")) + list((out / "phases").glob("*.safetensors"))
    assert files
    for f in files:
        tensors = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=False)["model"]
        for k, v in tensors.items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), f"{f}:{k}"


def test_a_diverging_run_stops_with_exit_1_and_keeps_its_last_finite_checkpoints(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", str(DEBUG_RECIPE), "--out", str(out), *DIVERGE)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("diverged:")]
    assert len(message) == 1 and "phase 's8-mse' step" in message[0] and "not finite" in message[0], result.stderr
    assert "done" not in result.stdout
    _all_finite(out)
    assert not (out / "phases" / "00-s8-mse.safetensors").exists()


def test_a_nan_step_stops_the_run_and_the_rerun_ends_as_if_nothing_happened(cli, tmp_path):
    whole, faulty = tmp_path / "whole", tmp_path / "faulty"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *NAN).returncode == 0
    first = cli("train", str(DEBUG_RECIPE), "--out", str(faulty), *NAN, env={"LD_NAN_AT_CALL": "3"})
    assert first.returncode == 1 and "phase 's8-mse' step 3: the loss of 'student' is not finite" in first.stderr
    assert sorted(p.name for p in (faulty / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    _all_finite(faulty)
    again = cli("train", str(DEBUG_RECIPE), "--out", str(faulty), *NAN)  # the fault is gone: resume from step 2
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_weights(final_weights(whole), final_weights(faulty))


def test_skipping_nonfinite_steps_counts_them_and_stops_past_the_cap(cli, tmp_path):
    skip = ["train.on_nonfinite=skip", "train.max_skipped_steps=1"]
    once = cli("train", str(DEBUG_RECIPE), "--out", str(tmp_path / "once"), *NAN, *skip, env={"LD_NAN_AT_CALL": "3"})
    assert once.returncode == 0, once.stderr[-2000:]
    assert "phase 's8-mse' step 3: skipped the step of 'student'" in once.stderr and "1 of at most 1" in once.stderr
    _all_finite(tmp_path / "once")
    twice = cli("train", str(DEBUG_RECIPE), "--out", str(tmp_path / "twice"), *NAN, *skip,
                env={"LD_NAN_AT_CALL": "2,4"})
    assert twice.returncode == 1, twice.stderr[-2000:]
    assert "step 4: 2 optimizer steps skipped as non-finite, more than train.max_skipped_steps (1)" in twice.stderr


def _cut(path):
    """A copy or disk fault: the file loses its second half."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_previous_intact_one(cli, tmp_path):
    whole, damaged = tmp_path / "whole", tmp_path / "damaged"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *KILLABLE).returncode == 0
    killed = cli("train", str(DEBUG_RECIPE), "--out", str(damaged), *KILLABLE, env={"LD_KILL_AT_STEP": "11"})
    assert killed.returncode != 0
    ckpts = damaged / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000008", "step-00000010"]
    _cut(ckpts / "step-00000010" / "state-student")
    again = cli("train", str(DEBUG_RECIPE), "--out", str(damaged), *KILLABLE)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "checkpoint step-00000010 is not usable" in again.stderr and "state-student" in again.stderr
    assert_same_weights(final_weights(whole), final_weights(damaged))


def test_no_intact_checkpoint_exits_2_naming_the_folder(cli, tmp_path):
    out = tmp_path / "run"
    killed = cli("train", str(DEBUG_RECIPE), "--out", str(out), *KILLABLE, env={"LD_KILL_AT_STEP": "11"})
    assert killed.returncode != 0
    for folder in (out / "checkpoints").iterdir():
        _cut(folder / "rank-0.pt")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = cli("train", str(DEBUG_RECIPE), "--out", str(out), *KILLABLE)
    assert again.returncode == 2, again.stderr[-2000:]
    assert f"error: no usable checkpoint in {out / 'checkpoints'}" in again.stderr and "Traceback" not in again.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts} == {
        p: b for p, b in before.items() if "tensorboard" not in p.parts}  # nothing deleted or changed


def test_a_damaged_phase_result_is_trained_again_from_a_checkpoint_before_it(cli, tmp_path):
    keep = ["train.checkpoint_every=1", "train.keep_last=20"]
    whole, damaged = tmp_path / "whole", tmp_path / "damaged"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(whole), *KILLABLE, *keep).returncode == 0
    killed = cli("train", str(DEBUG_RECIPE), "--out", str(damaged), *KILLABLE, *keep, env={"LD_KILL_AT_STEP": "9"})
    assert killed.returncode != 0
    _cut(damaged / "phases" / "00-s8-mse.safetensors")
    again = cli("train", str(DEBUG_RECIPE), "--out", str(damaged), *KILLABLE, *keep)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "00-s8-mse.safetensors has" in again.stderr  # named, then passed over for step 5 (inside the phase)
    assert "checkpoint step-00000006 is not usable" in again.stderr and "step-00000005" not in again.stderr
    assert_same_weights(final_weights(whole), final_weights(damaged))


def test_a_changed_phase_result_is_refused_before_use(cli, tmp_path):
    out = tmp_path / "run"
    assert cli("train", str(DEBUG_RECIPE), "--out", str(out)).returncode == 0
    artifact = out / "phases" / "00-s8-mse.safetensors"
    data = bytearray(artifact.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    artifact.write_bytes(bytes(data))
    result = cli("export", str(out), "--stage", "s8-mse", "--format", "diffusers", "--out", str(tmp_path / "export"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "phase result damaged" in result.stderr and "SHA-256 differs" in result.stderr
    assert not (tmp_path / "export").exists()


class _Payload:
    """Pickled, it asks the loader to create a file: what a planted checkpoint could make a resume do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_runs_nothing(cli, tmp_path):
    """Resuming reads a rank's state as tensors and plain data only: a checkpoint rewritten by someone else (its
    digests made to match) with a pickled call is refused with exit 2, and the call never runs."""
    import json

    from lightning_distill.engine.checkpoint import _meta_digest
    from lightning_distill.utils.files import digests

    out, marker = tmp_path / "run", tmp_path / "pwned"
    killed = cli("train", str(DEBUG_RECIPE), "--out", str(out), *KILLABLE, env={"LD_KILL_AT_STEP": "11"})
    assert killed.returncode != 0
    newest = out / "checkpoints" / "step-00000010"
    state = torch.load(newest / "rank-0.pt", weights_only=True)  # what the loop wrote loads without pickle's code
    torch.save({**state, "loader": _Payload(marker)}, newest / "rank-0.pt")
    meta = json.loads((newest / "meta.json").read_text())
    meta["files"] = digests(newest, sorted(meta["files"]))
    meta.pop("meta_sha256")
    meta["meta_sha256"] = _meta_digest(meta)
    (newest / "meta.json").write_text(json.dumps(meta, indent=2))
    again = cli("train", str(DEBUG_RECIPE), "--out", str(out), *KILLABLE)
    assert again.returncode == 2, again.stderr[-2000:]
    assert "rank-0.pt holds more than tensors and plain data" in again.stderr
    assert not marker.exists()
