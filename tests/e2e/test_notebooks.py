"""The ablation notebooks run top to bottom on a CPU and end in a plot (slow: a few minutes each at the reduced
budgets set here)."""

from __future__ import annotations


import pytest

from support import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_the_four_ablations():
    assert {p.stem for p in NOTEBOOKS} == {"adversarial_vs_mse", "conditional_vs_unconditional", "lora_vs_full", "objectives"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebooks_show_results_not_progress_bars_warnings_or_local_paths(path):
    import json

    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert all(c.get("execution_count") for c in cells), "a code cell was not run"
    assert not [o for o in outputs if o.get("name") == "stderr"], "stderr output (progress bars, warnings) committed"
    text = json.dumps(outputs)
    assert not any(p in text for p in ("/work/", "/tmp/", "/home/", "/Users/")), "a local path in the outputs"
    assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_ends_in_a_plot(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("LD_NOTEBOOK_SCALE", "0.15")
    monkeypatch.setenv("LD_NOTEBOOK_SAMPLES", "48")
    monkeypatch.setenv("LD_NOTEBOOK_RUNS", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert any("image/png" in out.get("data", {}) for out in last.outputs), "the last cell shows no plot"
    assert (next(tmp_path.iterdir()) / "metrics.json").is_file()
