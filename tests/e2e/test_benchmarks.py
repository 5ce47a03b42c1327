"""The benchmarks run (tiny, on CPU) and write their tables; their targets are judged in RESULTS.md, not here."""

from __future__ import annotations

import json
import sys

import pytest

from support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_step_benchmark_counts_flops_and_times_each_phase(tmp_path):
    import step

    results = tmp_path / "RESULTS.md"
    rows = step.main(["--tiny", "--steps", "1", "--cases", "mse full", "adv-uncond full", "adv-uncond full ckpt",
                      "--results", str(results)])
    assert [r["phase"] for r in rows] == ["mse full", "adv-uncond full", "adv-uncond full ckpt"]
    assert all(r["TFLOP/step"] > 0 and r["step s"] > 0 and 0 < r["MFU %"] for r in rows)
    # checkpointing recomputes, but model FLOPs do not count recomputation
    assert rows[1]["TFLOP/step"] == rows[2]["TFLOP/step"]
    text = results.read_text()
    assert "| phase | batch | step s |" in text and "commit `" in text and "python benchmarks/step.py --tiny" in text


def test_flops_match_an_independent_count_of_the_mse_step(tmp_path):
    """The mse step is teacher solver steps with CFG (2 forwards each) plus the student's forward and backward."""
    import step
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    rows = step.main(["--tiny", "--flops-only", "--cases", "mse full", "--no-record"])
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**step.TINY_UNET)
        b = step.make_batch(True, 2, torch.device("meta"))
        with FlopCounterMode(display=False) as fwd:
            unet(b["latents"], torch.zeros(2, device="meta"), encoder_hidden_states=b["text"],
                 added_cond_kwargs={"text_embeds": b["pooled"], "time_ids": b["time_ids"]})
    per_forward = fwd.get_total_flops() / 2  # per sample
    # 128 -> 32: 4 teacher steps x 2 (CFG) forwards, then the student's forward + backward (~3 forwards)
    expected = (4 * 2 + 3) * per_forward
    assert abs(rows[0]["TFLOP/step"] * 1e12 / expected - 1) < 0.05


def test_loop_overhead_and_data_benchmarks_run(tmp_path):
    import data_loading
    import loop_overhead

    results = tmp_path / "RESULTS.md"
    row = loop_overhead.main(["--steps", "8", "--rounds", "1", "--results", str(results)])
    assert row["bare ms/step"] > 0 and row["loop ms/step"] > 0
    rows = data_loading.main(["--rows", "16", "--shard", "8", "--latent", "8", "--batch", "4", "--batches", "3",
                              "--workers", "0", "--step-seconds", "1.0", "--results", str(results)])
    assert rows[0]["samples/s"] > 0 and rows[0]["step demand samples/s"] == 4.0
    text = results.read_text()
    assert text.count("### ") == 2 and "Loop overhead" in text and "Cached-latent loading" in text


@pytest.mark.slow  # about a minute on 2 cores: the default run stays under 15 minutes
def test_fidelity_benchmark_collects_every_row_over_seeds(tmp_path):
    """Two seeds of a very short main job: fidelity.json holds each report row with its seed; the table gives the
    mean and sd over seeds."""
    import json
    import subprocess

    out, summary = tmp_path / "runs", tmp_path / "fidelity.json"
    small = ["schedule.steps_scale=0.01", "train.batch_size=4", "callbacks.2.samples=64", "callbacks.2.teacher.steps=[4]",
             "callbacks.2.teacher.unguided=false", "callbacks.2.grid=4"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--seeds", "0", "1", "--out",
                           str(out), "--json", str(summary), "--no-record", *small], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    tree = json.loads(summary.read_text())
    assert tree["seeds"] == [0, 1] and "--seeds 0 1 -- schedule.steps_scale=0.01 " in tree["command"]  # runnable as printed
    assert "'callbacks.2.teacher.steps=[4]'" in tree["command"]  # quoted for the shell
    rows = tree["results"]
    assert {r["seed"] for r in rows} == {0, 1}
    per_seed = [{(r["model"], r["steps"]) for r in rows if r["seed"] == s} for s in (0, 1)]
    assert per_seed[0] == per_seed[1] and ("lightning", 1) in per_seed[0] and ("mse", 1) in per_seed[0]
    import fidelity

    table = {(r["model"], r["steps"]): r for r in fidelity.summarise(rows, fidelity.METRICS)}
    fd = [r["fd"] for r in rows if (r["model"], r["steps"]) == ("mse", 1)]
    mean, sd = table[("mse", 1)]["fd"].split(" ± ")
    assert abs(float(mean) - sum(fd) / 2) < 1e-3 and abs(float(sd) - abs(fd[0] - fd[1]) / 2**0.5) < 1e-3
    assert "| model | steps | seeds | fd |" in done.stdout
    # the discriminator's instruments of every adversarial phase, per seed, and their table
    phases = {(d["phase"], d["seed"]) for d in tree["discriminator"]}
    assert ("l1-cond", 0) in phases and ("a1-uncond", 1) in phases and len(phases) == 20
    assert ("| phase | seeds | d_accuracy_warmup | d_accuracy_end | d_pair_accuracy_warmup | d_pair_accuracy_end | "
            "d_loss_ratio_warmup | d_loss_ratio_end | d_accuracy_lowest_warmup | d_accuracy_lowest_end | "
            "student_teacher_gap |") in done.stdout


@pytest.mark.slow
def test_fault_injection_suite_passes_one_trial_of_each_fault():
    """benchmarks/faults.py --quick: one trial per fault group through the real CLI (about 3 min on 2 cores)."""
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "faults.py"), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) >= 10 and all("| 100 % |" in row for row in rows), result.stdout


def test_the_gpu_check_runs_dry_on_the_cpu_and_keeps_to_its_budget(tmp_path):
    """``benchmarks/gpu.py --dry-run``: every part's code path at tiny sizes (the script a lent GPU runs at real
    size); each measured phase has the plan's figure beside it; a budget too short skips and names what is left."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    results, out = tmp_path / "RESULTS.md", tmp_path / "gpu.json"
    report = gpu.main(["--dry-run", "--json", str(out), "--results", str(results), "--out", str(tmp_path / "runs")])
    parts = report["parts"]
    assert set(parts) == {"steps", "plan", "optimizers", "transformers", "tiny"}
    assert [r["phase"] for r in parts["steps"]] == ["adv-uncond lora ckpt"]
    assert all(r["TFLOP/step"] > 0 and r["step s"] > 0 for r in parts["steps"])
    assert {r["recipe"] for r in parts["plan"]} == {"lora_24gb.yaml", "full.yaml"}
    for r in parts["plan"] + parts["optimizers"] + parts["transformers"]:
        assert r["plan GiB"] > 0 and r["step s"] > 0 and r["TFLOP/step (plan)"] > 0, r
    assert [r["recipe"] for r in parts["transformers"]] == ["sd3 lora.yaml", "flux lora.yaml"]
    assert all(r["exit"] == 0 for r in parts["tiny"][:1])
    assert any("adam8bit" in s for s in report["skipped"])  # bitsandbytes' 8-bit Adam: CUDA only, and said so
    saved = json.loads(out.read_text())
    assert saved["parts"]["plan"][0]["peak GiB"] is None  # no CUDA peak on a CPU: null, not NaN
    text = results.read_text()
    assert text.count("### GPU check") == 5 and "python benchmarks/gpu.py --dry-run" in text

    short = gpu.main(["--dry-run", "--budget", "0", "--no-record", "--parts", "plan", "tiny"])
    assert short["parts"] == {"plan": [], "tiny": []}
    assert any(s.startswith("lora_24gb.yaml: phase") for s in short["skipped"]) and any("pytest" in s for s in short["skipped"])


SMALL = ["schedule.steps_scale=0.02", "train.batch_size=4"]


def _small_main_job(tmp_path):
    """The main job at 2 % of its steps, seed 0, through benchmarks/fidelity.py: its runs folder and the overrides.
    The main job itself, not the benchmark's default (which appends the adversarial stages from the MSE students,
    which no probe reads)."""
    import subprocess

    runs = tmp_path / "runs"
    report = ["callbacks.2.samples=64", "callbacks.2.teacher.steps=[4]", "callbacks.2.teacher.unguided=false",
              "callbacks.2.grid=4"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--seeds", "0", "--out", str(runs),
                           "--recipe", str(ROOT / "recipes" / "tiny" / "lightning.yaml"), "--json", str(tmp_path / "f.json"),
                           "--no-record", *SMALL, *report],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs, SMALL


@pytest.mark.slow  # a few minutes on 2 cores
def test_stage_probe_trains_one_stage_from_the_students_a_finished_run_left(tmp_path):
    """benchmarks/stage_probe.py: the phases before the probed stage are the finished run's, byte for byte, and not
    trained again; the stage trains as the probe recipe says; a recipe whose earlier stages differ is refused."""
    import json
    import subprocess

    from lightning_distill.config.recipe import load_recipe
    from lightning_distill.engine.checkpoint import Checkpoints

    runs, small = _small_main_job(tmp_path)
    probe_report = ["callbacks.0.samples=64", "callbacks.0.teacher.steps=[4]", "callbacks.0.grid=4"]
    ends = {}
    for name in ("stage_l1", "stage_l1_paper"):
        out = tmp_path / name
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stage_probe.py"), "--runs", str(runs),
                               "--recipe", str(ROOT / "recipes" / "tiny" / "probes" / f"{name}.yaml"), "--out", str(out),
                               "--seeds", "0", "--no-record", *small, *probe_report],
                              capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        phases = sorted(p.name for p in (out / "seed-0" / "phases").glob("*.safetensors"))
        before = ["00-s8-mse", "01-l4-cond", "02-l4-uncond", "03-l2-cond", "04-l2-uncond"]
        assert phases == [f"{p}.safetensors" for p in before + ["05-l1-cond", "06-l1-uncond"]]
        for p in before:  # copied, not trained again
            assert (out / "seed-0" / "phases" / f"{p}.safetensors").read_bytes() == \
                (runs / "seed-0" / "phases" / f"{p}.safetensors").read_bytes()
        rows = json.loads((out / "seed-0" / "metrics.json").read_text())["results"]
        assert [(r["model"], r["steps"]) for r in rows if r["model"] != "teacher"] == [("lightning", 1)]
        assert "| lightning | 1 | 1 |" in done.stdout and "fd per seed" in done.stdout
        # the stage trained as long as this probe recipe says (the two recipes' 1-step stages differ in length)
        recipe = load_recipe(str(ROOT / "recipes" / "tiny" / "probes" / f"{name}.yaml"), [*small, *probe_report])
        ends[name] = recipe.recipe.schedule.build().phases()[-1].end
        last = Checkpoints(out / "seed-0" / "checkpoints", fabric=None, keep_last=1).latest()  # reads folders only
        assert last is not None and Checkpoints.meta(last)["step"] == ends[name]
    assert ends["stage_l1"] != ends["stage_l1_paper"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stage_probe.py"), "--runs", str(runs), "--recipe",
                           str(ROOT / "recipes" / "tiny" / "probes" / "stage_l1.yaml"), "--out", str(tmp_path / "other"),
                           "--seeds", "0", "--no-record", "schedule.steps_scale=0.03", "train.batch_size=4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode != 0 and "must be the run's own" in done.stderr
    assert not (tmp_path / "other" / "seed-0").exists()


@pytest.mark.slow  # a few minutes on 2 cores
def test_branch_probe_repeats_the_mse_branch_of_a_finished_run_without_its_lightning_stages(tmp_path):
    """benchmarks/branch_probe.py: from a finished run's 8-step student alone, the MSE branch trains to the same
    weights as in the run (phase indices, noise and batches paired), and an override changes only its stage."""
    import json
    import subprocess

    from safetensors.torch import load_file

    runs, small = _small_main_job(tmp_path)
    probe_report = ["callbacks.0.samples=64", "callbacks.0.teacher.steps=[4]", "callbacks.0.grid=4"]
    outs = {}
    for name, extra in (("same", []), ("longer", ["schedule.stages.m1.phases.0.steps=400"])):
        outs[name] = out = tmp_path / name / "seed-0"
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "branch_probe.py"), "--runs", str(runs),
                               "--recipe", str(ROOT / "recipes" / "tiny" / "lightning.yaml"), "--out", str(out.parent),
                               "--seeds", "0", "--no-record", *small, *probe_report, *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = json.loads((out / "metrics.json").read_text())["results"]
        assert [(r["model"], r["steps"]) for r in rows if r["model"] != "teacher"] == [("mse", 2), ("mse", 1)]
        assert "fd_patch per seed" in done.stdout
        assert not any(f.stat().st_size > 100 for f in (out / "phases").glob("0[1-6]-*.safetensors"))  # placeholders
    ran = {p.name: p for p in (runs / "seed-0" / "phases").glob("*-m*-mse.safetensors")}
    assert sorted(ran) == ["07-m4-mse.safetensors", "08-m2-mse.safetensors", "09-m1-mse.safetensors"]

    def same(a, b) -> bool:
        x, y = load_file(a), load_file(b)
        return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)

    for name, path in ran.items():  # the branch as the run trained it, without the Lightning stages before it
        assert same(outs["same"] / "phases" / name, path), name
    assert same(outs["longer"] / "phases" / "08-m2-mse.safetensors", ran["08-m2-mse.safetensors"])
    assert not same(outs["longer"] / "phases" / "09-m1-mse.safetensors", ran["09-m1-mse.safetensors"])
