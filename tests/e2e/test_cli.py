"""The tests' way of running the CLI (``support.run_cli``) answers as ``python -m lightning_distill`` does."""

from __future__ import annotations

import signal

from support import DEBUG_RECIPE, KILLABLE, run_cli


def test_the_forked_cli_answers_as_a_fresh_interpreter_does(monkeypatch, tmp_path):
    """Exit code, stdout and stderr of a success, a user error and an argument error are those of a fresh
    interpreter; the process sees the call's LD_* environment (the kill callback reads it) and dies of its signal."""
    calls = [["validate", str(DEBUG_RECIPE), "train.batch_size=3"], ["validate", str(tmp_path / "missing.yaml")],
             ["export"]]
    forked = [run_cli(*args) for args in calls]
    monkeypatch.setenv("LD_TESTS_FRESH_PROCESSES", "1")
    fresh = [run_cli(*args) for args in calls]
    for args, a, b in zip(calls, forked, fresh):
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr), args
    assert [a.returncode for a in forked] == [0, 2, 2] and "batch_size: 3" in forked[0].stdout
    monkeypatch.delenv("LD_TESTS_FRESH_PROCESSES")
    killed = run_cli("train", str(DEBUG_RECIPE), "--out", str(tmp_path / "run"), *KILLABLE, env={"LD_KILL_AT_STEP": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
