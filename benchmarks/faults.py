"""Fault injection: kills, damaged checkpoints, NaN, a full disk and bad inputs, each checked for what survives.

Every trial runs the real CLI in fresh processes (``benchmarks/inject.py`` injects the fault) and passes only if
the run's end state is what the uninterrupted run leaves, bit for bit, and nothing written before was lost:

- **kill, random moment** / **kill during a write** (1 process and FSDP2 x 2): SIGKILL every process of the run
  at a random time, or just before or after a random one of its file writes (checkpoint, phase result, recipe,
  rename); the checkpoints left must verify, and running the same command again must end with phase results
  identical to the uninterrupted run's and no temporary files.
- **kill during export / cache**: the export folder is the old one or absent (never half-written) and the rerun
  writes the same bytes as an uninterrupted export; the cache's shards equal the uninterrupted cache's.
- **damaged newest checkpoint**: a file of it cut short, emptied, deleted or with a byte flipped: the rerun warns,
  resumes from the one before and ends identical.
- **NaN at a step**: exit 1 with one message, every saved tensor finite, and the rerun (fault gone) identical.
- **disk full**: an ``OSError(ENOSPC)`` at a random write: exit 2 with one message, earlier checkpoints intact,
  and the rerun identical.
- **bad inputs**: recipes, overrides, data folders and tar shards that are binary, not UTF-8, folders where files
  belong, symlink loops, huge declared images, CMYK / 16-bit / palette / alpha images, empty files, duplicate
  keys: the expected exit code and message, no traceback, and the run folder unchanged.

    python benchmarks/faults.py                 # every group (about 25 min on 2 CPU cores)
    python benchmarks/faults.py --quick         # one trial per group, no RESULTS.md row (a slow test runs it)

Writes ``benchmarks/faults.json`` and a table in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INJECT = ROOT / "benchmarks" / "inject.py"
HELPERS = ROOT / "tests" / "helpers"
DEBUG = str(ROOT / "recipes" / "debug.yaml")
TINY = str(ROOT / "recipes" / "tiny" / "lightning.yaml")
# the debug recipe with the tests' kill callback and NaN loss (both idle unless their variables are set)
TRAIN = ["imports=[killer, nan_loss]", "callbacks=[{name: kill_at_env}, {name: tensorboard}]",
         "method.regression_loss={name: nan_at_env}", "train.checkpoint_every=2", "train.keep_last=2"]
FSDP2 = ["fabric.devices=2", "fabric.strategy=fsdp2"]
CACHE = ["data.size=24", "train.batch_size=4"]
# a run of the tiny world with a network diffusers can load (for exports): an MSE phase and an adversarial one
EXPORTABLE = [str(ROOT / "recipes" / "tiny" / "_base.yaml"), "train.batch_size=2", "data.size=16",
              "schedule={name: ladder, stages: [{name: s8, teacher_steps: 32, student_steps: 8, phases: [{kind: mse, "
              "steps: 2, lr: 1.0e-4}]}, {name: l4, student_steps: 4, phases: [{kind: adversarial, conditional: true, "
              "steps: 2, lr: 1.0e-5}]}]}"]


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Group:
    name: str
    expectation: str
    trials: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def cli(args: list[str], fault: str | None = None, env: dict[str, str] | None = None, kill_after: float | None = None,
        timeout: float = 900) -> Result:
    """The CLI in a fresh process group (so a kill takes every rank), with ``fault`` injected."""
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]),
            **(env or {})}
    full.pop("LD_FAULT", None)
    if fault:
        full["LD_FAULT"] = fault
    proc = subprocess.Popen([sys.executable, str(INJECT), *args], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if kill_after is None:
            err += "\n[timed out]"
    return Result(proc.returncode, out, err)


def events(args: list[str], env: dict[str, str] | None = None, what: str = "count") -> tuple[Result, int]:
    """Run ``args`` once, counting its write events (``count-data``: data writes alone; the most any of its
    processes made)."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        result = cli(args, what, {**(env or {}), "LD_FAULT_LOG": log.name})
        counts = [int(n) for n in Path(log.name).read_text().split()]
    if result.code != 0:
        raise SystemExit(f"reference run failed: {' '.join(args)}\n{result.err[-3000:]}")
    return result, max(counts)


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted((out / "phases").glob("*.safetensors"))}


def same_weights(a: dict, b: dict) -> str | None:
    if a.keys() != b.keys() or not a:
        return f"phase results {sorted(a)} vs {sorted(b)}"
    for name in a:
        if a[name].keys() != b[name].keys() or any(not torch.equal(a[name][k], b[name][k]) for k in a[name]):
            return f"{name} differs"
    return None


def leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith((".tmp-", ".old-"))]


def checkpoints_intact(out: Path) -> str | None:
    """Every complete checkpoint verifies and every saved tensor is finite."""
    from lightning_distill.engine.artifacts import artifact_damage
    from lightning_distill.engine.checkpoint import Checkpoints

    class Fabric:
        is_global_zero, global_rank, world_size = True, 0, 1

    ckpts = Checkpoints(out / "checkpoints", Fabric(), 1)
    for path in ckpts.complete():
        if problem := ckpts.damage(path):
            return problem
        for f in path.glob("state-*"):
            if f.is_file() and not all(torch.isfinite(v).all() for v in torch.load(f, weights_only=False)["model"].values()):
                return f"{f} holds non-finite weights"
    for f in (out / "phases").glob("*.safetensors") if (out / "phases").is_dir() else []:
        if problem := artifact_damage(f):
            return problem
        if not all(torch.isfinite(v).all() for v in load_file(str(f)).values() if v.is_floating_point()):
            return f"{f} holds non-finite weights"
    return None


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def messages(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


class Suite:
    def __init__(self, work: Path, quick: bool, seed: int) -> None:
        self.work, self.quick, self.rng = work, quick, random.Random(seed)
        self.groups: list[Group] = []
        self.refs: dict[str, tuple[Path, int, float]] = {}
        self.made = 0

    def n(self, full: int) -> int:
        return 1 if self.quick else full

    def folder(self, name: str) -> Path:
        """A new path under the work folder (not created)."""
        self.made += 1
        return self.work / f"{name}-{self.made}"

    def trial(self, group: Group, label: str, check: Callable[[], str | None]) -> None:
        group.trials += 1
        try:
            problem = check()
        except Exception as err:  # a failed trial is a row, not a crash of the suite
            problem = f"{type(err).__name__}: {err}"
        if problem is None:
            group.passed += 1
        else:
            group.failures.append(f"{label}: {problem}")
            print(f"  FAIL {group.name} / {label}: {problem[:2000]}", flush=True)

    def reference(self, key: str, extra: list[str]) -> tuple[Path, int, float]:
        """An uninterrupted run (and its count of write events and its duration), made once."""
        if key not in self.refs:
            out = self.folder(f"ref-{key}")
            start = time.perf_counter()
            _, count = events(["train", DEBUG, "--out", str(out), *TRAIN, *extra])
            self.refs[key] = (out, count, time.perf_counter() - start)
        return self.refs[key]

    def resumed_identical(self, out: Path, extra: list[str], ref: Path, env: dict[str, str] | None = None) -> str | None:
        again = cli(["train", DEBUG, "--out", str(out), *TRAIN, *extra], env=env)
        if again.code != 0:
            return f"rerun exit {again.code}: {again.err[-1500:]}"
        return same_weights(weights(ref), weights(out)) or (f"left {leftovers(out)}" if leftovers(out) else None)

    # ---- kills ----------------------------------------------------------------------------------------------

    def kill_random_moment(self) -> None:
        g = Group("kill at a random moment (1 process, up to 2 kills, then rerun)",
                  "rerun exit 0; results bit-identical to an uninterrupted run; no temporary files")
        ref, _, seconds = self.reference("single", [])
        for i in range(self.n(8)):
            out = self.folder("kill-time")

            def check() -> str | None:
                for _ in range(1 + self.rng.randint(0, 1)):
                    delay = self.rng.uniform(0.2, 1.0) * seconds
                    killed = cli(["train", DEBUG, "--out", str(out), *TRAIN], kill_after=delay)
                    if killed.code == 0:
                        break  # it finished before the kill: the rerun below must still leave the same results
                    if killed.code != -signal.SIGKILL:
                        return f"exit {killed.code} before the kill: {killed.err[-1500:]}"
                    if out.exists() and (problem := checkpoints_intact(out)):
                        return f"after a kill at {delay:.1f} s: {problem}"
                return self.resumed_identical(out, [], ref)

            self.trial(g, f"trial {i}", check)
        self.groups.append(g)

    def kill_during_write(self, fsdp: bool) -> None:
        extra = FSDP2 if fsdp else []
        g = Group(f"kill during a file write ({'FSDP2 x 2 processes' if fsdp else '1 process'})",
                  "checkpoints left verify; rerun exit 0; results bit-identical; no temporary files")
        ref, count, _ = self.reference("fsdp2" if fsdp else "single", extra)
        for i in range(self.n(6 if fsdp else 12)):
            at, mode = self.rng.randint(1, count), self.rng.choice(["kill", "kill-after"])
            out = self.folder("kill-write")

            def check() -> str | None:
                killed = cli(["train", DEBUG, "--out", str(out), *TRAIN, *extra], fault=f"{mode}:{at}")
                if killed.code != -signal.SIGKILL:
                    return f"exit {killed.code}, not killed: {killed.err[-1500:]}"
                if out.exists() and (problem := checkpoints_intact(out)):
                    return problem
                return self.resumed_identical(out, extra, ref)

            self.trial(g, f"{mode} at write {at} of {count}", check)
        self.groups.append(g)

    def kill_during_export(self) -> None:
        g = Group("kill during an export write (diffusers, lora, comfyui; new or existing folder)",
                  "the folder is absent or the complete previous export; rerun writes the same bytes")
        run = self.folder("exportable")
        made = cli(["train", EXPORTABLE[0], "--out", str(run), *EXPORTABLE[1:]])
        if made.code != 0:
            raise SystemExit(f"reference run failed:\n{made.err[-3000:]}")
        refs: dict[str, tuple[Path, dict[str, bytes], int]] = {}
        for fmt in ("diffusers", "lora", "comfyui"):
            out = self.folder(f"export-ref-{fmt}")
            _, count = events(["export", str(run), "--format", fmt, "--rank", "4", "--out", str(out)])
            refs[fmt] = (out, folder_bytes(out), count)
        for i in range(self.n(6)):
            fmt = ("diffusers", "lora", "comfyui")[i % 3]
            ref_out, expected, count = refs[fmt]
            at, mode, existing = self.rng.randint(1, count), self.rng.choice(["kill", "kill-after"]), i % 2 == 1
            out = self.folder(f"export-{fmt}")

            def check() -> str | None:
                if existing:  # an earlier export of the same model is there: it must survive the kill
                    shutil.copytree(ref_out, out)
                args = ["export", str(run), "--format", fmt, "--rank", "4", "--out", str(out)]
                killed = cli(args, fault=f"{mode}:{at}")
                if killed.code != -signal.SIGKILL:
                    return f"exit {killed.code}, not killed: {killed.err[-1500:]}"
                old = out.with_name(f".old-{out.name}")
                if out.exists() and folder_bytes(out) != expected:
                    return "the folder holds a half-written export"
                if existing and not out.exists() and not (old.exists() and folder_bytes(old) == expected):
                    return "the previous export is gone"
                again = cli(args)
                if again.code != 0:
                    return f"rerun exit {again.code}: {again.err[-1500:]}"
                if folder_bytes(out) != expected:
                    return "the rerun's export differs from an uninterrupted one"
                return f"left {leftovers(out.parent)}" if any(out.name in x for x in leftovers(out.parent)) else None

            self.trial(g, f"{fmt}, {'existing' if existing else 'new'} folder, {mode} at write {at} of {count}", check)
        self.groups.append(g)

    def kill_during_cache(self) -> None:
        g = Group("kill during a cache write", "rerun exit 0; the same samples, shard by shard, as an uninterrupted cache")
        ref = self.folder("cache-ref")
        _, count = events(["cache", TINY, *CACHE, "--out", str(ref), "--shard-size", "8"])
        expected = {p.name: load_file(str(p)) for p in sorted(ref.glob("shard-*.safetensors"))}
        for i in range(self.n(4)):
            at, mode = self.rng.randint(1, count), self.rng.choice(["kill", "kill-after"])
            out = self.folder("cache")

            def check() -> str | None:
                args = ["cache", TINY, *CACHE, "--out", str(out), "--shard-size", "8"]
                killed = cli(args, fault=f"{mode}:{at}")
                if killed.code != -signal.SIGKILL:
                    return f"exit {killed.code}, not killed: {killed.err[-1500:]}"
                again = cli(args)
                if again.code != 0:
                    return f"rerun exit {again.code}: {again.err[-1500:]}"
                got = {p.name: load_file(str(p)) for p in sorted(out.glob("shard-*.safetensors"))}
                if got.keys() != expected.keys() or any(
                        got[s].keys() != expected[s].keys() or not all(torch.equal(got[s][k], expected[s][k])
                                                                         for k in got[s]) for s in got):
                    return "shards differ from an uninterrupted cache"
                return f"left {leftovers(out)}" if leftovers(out) else None

            self.trial(g, f"{mode} at write {at} of {count}", check)
        self.groups.append(g)

    # ---- damage, NaN, full disk -----------------------------------------------------------------------------

    def damaged_checkpoint(self) -> None:
        g = Group("damaged newest checkpoint (a file cut short, emptied, deleted or a byte flipped)",
                  "rerun warns naming it, resumes from the one before, exit 0, results bit-identical")
        ref, _, _ = self.reference("single", [])
        for i in range(self.n(6)):
            kill_at = self.rng.randint(5, 13)
            kind = ["cut", "empty", "delete", "flip"][i % 4]
            out = self.folder("damaged")
            label = f"{kind}, killed at step {kill_at}"

            def check() -> str | None:
                nonlocal label
                first = cli(["train", DEBUG, "--out", str(out), *TRAIN], env={"LD_KILL_AT_STEP": str(kill_at)})
                if first.code != -signal.SIGKILL:
                    return f"exit {first.code}: {first.err[-1500:]}"
                newest = sorted((out / "checkpoints").glob("step-*"))[-1]
                victim = self.rng.choice(sorted(p for p in newest.rglob("*") if p.is_file()))
                label += f", {victim.relative_to(out)}"
                data = victim.read_bytes()
                if kind == "cut":
                    victim.write_bytes(data[: len(data) // 2])
                elif kind == "empty":
                    victim.write_bytes(b"")
                elif kind == "delete":
                    victim.unlink()
                else:
                    flipped = bytearray(data)
                    flipped[self.rng.randrange(len(data))] ^= 0x01
                    victim.write_bytes(bytes(flipped))
                again = cli(["train", DEBUG, "--out", str(out), *TRAIN])
                if again.code != 0:
                    return f"rerun exit {again.code}: {again.err[-1500:]}"
                quiet_ok = victim.name == "meta.json" and kind == "delete"  # then it is not a checkpoint at all
                if not quiet_ok and f"checkpoint {newest.name} is not usable" not in again.err:
                    return "no warning naming the damaged checkpoint"
                return same_weights(weights(ref), weights(out))

            self.trial(g, label, check)
        self.groups.append(g)

    def nan_at_step(self) -> None:
        g = Group("NaN loss injected at a chosen step (stop; then rerun without it)",
                  "exit 1, one 'diverged:' line, no traceback, every saved tensor finite; rerun bit-identical")
        ref, _, _ = self.reference("single", [])
        for i in range(self.n(4)):
            at = self.rng.randint(1, 6)  # the MSE phase's steps
            out = self.folder("nan")

            def check() -> str | None:
                first = cli(["train", DEBUG, "--out", str(out), *TRAIN], env={"LD_NAN_AT_CALL": str(at)})
                if first.code != 1 or len(messages(first.err, "diverged:")) != 1 or "Traceback" in first.err:
                    return f"exit {first.code}: {first.err[-1500:]}"
                if f"step {at}:" not in first.err:
                    return "the message does not name the step"
                if out.exists() and (problem := checkpoints_intact(out)):
                    return problem
                return self.resumed_identical(out, [], ref)

            self.trial(g, f"NaN at step {at}", check)
        skip = Group("NaN loss at a chosen step, train.on_nonfinite=skip",
                     "exit 0, the skipped step named, every saved tensor finite")
        for i in range(self.n(2)):
            at = self.rng.randint(1, 6)
            out = self.folder("nan-skip")

            def check_skip() -> str | None:
                run = cli(["train", DEBUG, "--out", str(out), *TRAIN, "train.on_nonfinite=skip"],
                          env={"LD_NAN_AT_CALL": str(at)})
                if run.code != 0 or f"step {at}: skipped the step of 'student'" not in run.err:
                    return f"exit {run.code}: {run.err[-1500:]}"
                return checkpoints_intact(out)

            self.trial(skip, f"NaN at step {at}", check_skip)
        self.groups += [g, skip]

    def disk_full(self) -> None:
        g = Group("disk full (OSError ENOSPC at a random data write; then rerun)",
                  "exit 2, one 'error:' line naming the file, no traceback, earlier checkpoints intact; rerun identical")
        ref, _, _ = self.reference("single", [])
        _, count = events(["train", DEBUG, "--out", str(self.folder("count-data")), *TRAIN], what="count-data")
        for i in range(self.n(8)):
            at = self.rng.randint(1, count)
            out = self.folder("enospc")

            def check() -> str | None:
                first = cli(["train", DEBUG, "--out", str(out), *TRAIN], fault=f"enospc:{at}")
                lines = messages(first.err, "error:")
                if first.code != 2 or len(lines) != 1 or "No space left" not in lines[0] or "Traceback" in first.err:
                    return f"exit {first.code}: {first.err[-1500:]}"
                if out.exists() and (problem := checkpoints_intact(out)):
                    return problem
                return self.resumed_identical(out, [], ref)

            self.trial(g, f"ENOSPC at data write {at} of {count}", check)
        self.groups.append(g)

    # ---- bad inputs -----------------------------------------------------------------------------------------

    def bad_inputs(self) -> None:
        from PIL import Image

        base = self.folder("bad")
        base.mkdir()

        def png(mode: str, size=(32, 32), color=None, **save) -> bytes:
            buf = io.BytesIO()
            image = Image.new(mode, size, color if color is not None else 0)
            image.save(buf, "JPEG" if mode == "CMYK" else "PNG", **save)
            return buf.getvalue()

        def rgb(seed: int) -> bytes:
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            return buf.getvalue()

        def huge_png() -> bytes:  # a valid header declaring 100000 x 100000 pixels
            data = bytearray(rgb(0))
            data[16:24] = (100000).to_bytes(4, "big") * 2
            import zlib

            data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
            return bytes(data)

        def write(folder: Path, files: dict[str, bytes | None]) -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                if data is None:
                    (folder / name).mkdir()
                else:
                    (folder / name).write_bytes(data)
            return folder

        good = {f"good{i}.png": rgb(i) for i in range(3)} | {f"good{i}.txt": b"a red square" for i in range(3)}
        modes = {"cmyk.jpg": png("CMYK", color=(0, 255, 0, 0)), "grey16.png": None, "palette.png": png("P", color=3),
                 "alpha.png": png("RGBA", color=(255, 0, 0, 128)), "la.png": png("LA", color=(90, 200))}
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)).save(buf, "PNG")
        modes["grey16.png"] = buf.getvalue()
        modes |= {f"{Path(k).stem}.txt": b"a shape" for k in list(modes)}
        broken = {"empty.png": b"", "empty.txt": b"a cat", "huge.png": huge_png(), "huge.txt": b"a dog",
                  "binary.png": os.urandom(300), "binary.txt": b"a cat", "cut.png": rgb(9)[:200], "cut.txt": b"a cut",
                  "latin.png": rgb(8), "latin.txt": "caf\xe9".encode("latin-1"), "folder.png": None}

        images = write(base / "images", good | modes | broken)
        (images / "loop").symlink_to(".")  # a symlink loop inside the data folder
        write(base / "all-bad", {k: v for k, v in broken.items()})
        meta_missing = write(base / "meta", {f"good{i}.png": rgb(i) for i in range(3)})
        (meta_missing / "metadata.jsonl").write_text("\n".join(
            json.dumps({"file_name": n, "text": "a red square"}) for n in ["good0.png", "good1.png", "good2.png", "gone.png"]))
        (base / "a-file").write_bytes(b"not a folder")

        def shard(name: str, members: list[tuple[str, bytes]]) -> str:
            path = base / name
            with tarfile.open(path, "w") as tar:
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            return str(path)

        dup = shard("dup.tar", [("a.png", rgb(1)), ("a.txt", b"a cat"), ("a.png", rgb(2)), ("b.png", rgb(3)),
                                ("b.txt", b"a dog"), ("c.png", rgb(4)), ("c.txt", b"\xff\xfe")])
        (base / "empty.tar").write_bytes(b"")
        (base / "random.tar").write_bytes(os.urandom(4096))
        (base / "folder.tar").mkdir()
        (base / "recipe-dir.yaml").mkdir()
        (base / "loop.yaml").symlink_to("loop.yaml")
        (base / "binary.yaml").write_bytes(os.urandom(512))
        (base / "latin.yaml").write_bytes(Path(DEBUG).read_bytes() + "# caf\xe9\n".encode("latin-1"))
        (base / "empty.yaml").write_bytes(b"")
        (base / "extends-dir.yaml").write_text("extends: recipe-dir.yaml\n")

        def folder_data(root: Path) -> str:
            return f"data={{name: image_folder, root: '{root}', resolution: 32, min_size: 16}}"

        def shard_data(*paths: str) -> str:
            return "data={name: tar_shards, shards: [" + ", ".join(f"'{p}'" for p in paths) + "], resolution: 32}"

        # (group, label, command before --out, exit code, pieces of the one message, cached samples when exit 0)
        cases: list[tuple[str, str, list[str], int, list[str], int | None]] = [
            ("recipes", "binary file", ["train", str(base / "binary.yaml")], 2, ["not a text file"], None),
            ("recipes", "not UTF-8", ["train", str(base / "latin.yaml")], 2, ["latin.yaml", "not a text file"], None),
            ("recipes", "a folder", ["train", str(base / "recipe-dir.yaml")], 2, ["is a folder"], None),
            ("recipes", "symlink loop", ["train", str(base / "loop.yaml")], 2, ["cannot read recipe", "loop"], None),
            ("recipes", "empty file", ["train", str(base / "empty.yaml")], 2, ["missing required key"], None),
            ("recipes", "extends a folder", ["train", str(base / "extends-dir.yaml")], 2, ["is a folder", "extended by"], None),
            ("overrides", "value not UTF-8", ["train", DEBUG, "seed=\udcff"], 2, ["not UTF-8 text"], None),
            ("overrides", "binary value", ["train", DEBUG, "seed=\x01\x02"], 2, ["seed"], None),
            ("overrides", "data root is a file", ["train", TINY, folder_data(base / "a-file")], 2, ["no folder"], None),
            ("overrides", "data root is a symlink loop", ["train", TINY, folder_data(base / "loop.yaml")], 2,
             ["no folder"], None),
            ("data folders", "bad images among good ones (empty, huge, binary, cut, non-UTF-8 caption, a folder "
             "named .png, a symlink loop) and CMYK / 16-bit / palette / alpha / LA images",
             ["cache", TINY, folder_data(images)], 0,
             ["unreadable image", "truncated or corrupt image", "missing caption", "huge.png", "empty.png"], 8),
            ("data folders", "only bad images", ["cache", TINY, folder_data(base / "all-bad")], 2,
             ["no sample of the data could be decoded", "cut.png"], None),
            ("data folders", "metadata.jsonl names a missing file", ["cache", TINY, folder_data(meta_missing)], 0,
             ["1 missing file named in metadata.jsonl", "gone.png"], 3),
            ("shards", "duplicate keys, a non-UTF-8 caption", ["cache", TINY, shard_data(dup)], 0,
             ["duplicate key in a shard", "missing caption"], 2),
            ("shards", "empty file", ["cache", TINY, shard_data(str(base / "empty.tar"))], 2, ["empty.tar"], None),
            ("shards", "random bytes", ["cache", TINY, shard_data(str(base / "random.tar"))], 2, ["random.tar"], None),
            ("shards", "a folder", ["cache", TINY, shard_data(str(base / "folder.tar"))], 2, ["folder.tar"], None),
        ]
        if self.quick:
            cases = [cases[0], cases[10]]
        groups = {name: Group(f"bad inputs: {name}", "") for name in dict.fromkeys(c[0] for c in cases)}
        for name, group in groups.items():
            group.expectation = "; ".join(f"{c[1]} → exit {c[3]}" for c in cases if c[0] == name)
        for name, label, command, code, pieces, samples in cases:
            out = self.folder("bad-out")
            out.mkdir()
            (out / "keep.txt").write_text("written before")

            def check() -> str | None:
                target = out / "cache" if command[0] == "cache" else out
                args = [*command, *(CACHE[1:] if command[0] == "cache" else []), "--out", str(target)]
                before = folder_bytes(out)
                result = cli(args)
                if result.code != code or "Traceback" in result.err:
                    return f"exit {result.code} (expected {code}): {result.err[-1500:]}"
                if code == 2:
                    lines = messages(result.err, "error:")
                    if len(lines) != 1 or not all(p in lines[0] for p in pieces):
                        return f"message {lines} lacks {pieces}"
                    if folder_bytes(out) != before:
                        return "the folder changed"
                    return None
                manifest = json.loads((target / "manifest.json").read_text())
                if manifest["total"] != samples:
                    return f"{manifest['total']} samples cached, expected {samples}"
                missing = [p for p in pieces if p not in (manifest["skipped"] or "")]
                return f"the summary lacks {missing}: {manifest['skipped']}" if missing else None

            self.trial(groups[name], label, check)
        self.groups += list(groups.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one trial per group; no RESULTS.md row")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments, writes and damage")
    parser.add_argument("--only", nargs="*", help="groups by method name, e.g. kill_during_write disk_full")
    args = parser.parse_args()
    steps = ["kill_random_moment", "kill_during_write", "kill_during_write_fsdp2", "kill_during_export",
             "kill_during_cache", "damaged_checkpoint", "nan_at_step", "disk_full", "bad_inputs"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ld-faults-") as work:
        suite = Suite(Path(work), args.quick, args.seed)
        for step in steps:
            if args.only and step not in args.only:
                continue
            before = len(suite.groups)
            t0 = time.perf_counter()
            print(f"== {step}", flush=True)
            if step == "kill_during_write_fsdp2":
                suite.kill_during_write(fsdp=True)
            elif step == "kill_during_write":
                suite.kill_during_write(fsdp=False)
            else:
                getattr(suite, step)()
            for g in suite.groups[before:]:
                g.seconds = (time.perf_counter() - t0) / (len(suite.groups) - before)
    rows = [{"fault": g.name, "trials": g.trials, "passed": g.passed, "rate": f"{100 * g.passed / max(1, g.trials):.0f} %",
             "expected": g.expectation} for g in suite.groups]
    total = sum(g.trials for g in suite.groups), sum(g.passed for g in suite.groups)
    command = "python benchmarks/faults.py" + (f" --seed {args.seed}" if args.seed else "")
    device = f"CPU, {os.cpu_count()} cores · {total[1]}/{total[0]} trials passed in {(time.perf_counter() - start) / 60:.1f} min"
    record("Fault injection", command, device, rows, results=None if args.quick or args.only else
           Path(__file__).resolve().parent / "RESULTS.md")
    if not args.quick and not args.only:
        (Path(__file__).resolve().parent / "faults.json").write_text(json.dumps(
            [{**g.__dict__} for g in suite.groups], indent=2) + "\n")
    for g in suite.groups:
        for failure in g.failures:
            print(f"FAILED {g.name}: {failure}")
    sys.exit(0 if total[0] == total[1] else 1)


if __name__ == "__main__":
    main()
