"""What only a CUDA device can show (skipped without one; ``benchmarks/gpu.py`` runs them with ``pytest -m gpu``)."""

from __future__ import annotations

import pytest
import torch

from support import DEBUG_RECIPE, ROOT

pytestmark = pytest.mark.gpu


def test_the_debug_recipe_trains_on_cuda_in_bf16_and_resumes(cli, tmp_path):
    out = tmp_path / "run"
    args = ("--out", str(out), "fabric.accelerator=cuda", "fabric.precision=bf16-mixed")
    result = cli("train", str(DEBUG_RECIPE), *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done:" in result.stdout
    again = cli("train", str(DEBUG_RECIPE), *args)  # finished: nothing left to train, nothing lost
    assert again.returncode == 0, again.stderr[-3000:]


def test_eight_bit_adam_steps_on_cuda_and_lowers_a_loss():
    from lightning_distill.config.recipe import load_recipe

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256, device="cuda")
    target = torch.randn(64, 256, device="cuda")
    x = torch.randn(64, 256, device="cuda")
    spec = load_recipe(DEBUG_RECIPE, ["optimizer.name=adam8bit"]).recipe.optimizer  # as setup_phase builds it
    opt = spec.build(list(layer.parameters()), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]
    state = opt.state[layer.weight]
    assert any(v.dtype == torch.uint8 for v in state.values() if torch.is_tensor(v))  # 8-bit moments


def test_the_plans_peak_is_within_15_percent_of_cuda_max_memory_allocated():
    """``benchmarks/gpu.py``'s measurement of one phase (random weights from the tiny configs) against ``plan``."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    with gpu.tiny_configs(True):
        gpu.RATE[0] = 1e12
        row = gpu.measure_phase(ROOT / "recipes" / "sdxl_lightning" / "lora.yaml",
                                [*gpu.DRY, "train.batch_size=4", "method.student.gradient_checkpointing=false"], 1,
                                torch.device("cuda"), steps=1)
    assert 0.85 <= row["measured/plan"] <= 1.15, row
