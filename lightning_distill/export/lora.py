"""LoRA files of a distilled network: the difference to the base network on the LoRA-targeted layers, factored by
SVD, in peft names (diffusers ``load_lora_weights``) or kohya/ComfyUI names (with every other changed weight as a
whole difference)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from lightning_distill.methods.base import PhaseModel

log = logging.getLogger(__name__)


LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(A, B, relative error)`` with ``B @ A ≈ delta`` (conv weights flattened), by truncated SVD."""
    out = delta.shape[0]
    mat = delta.reshape(out, -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    b, a = u[:, :r] * s[:r], vh[:r]
    err = float((mat - b @ a).norm() / mat.norm()) if mat.norm() > 0 else 0.0
    if delta.ndim == 4:
        a = a.reshape(r, *delta.shape[1:])
        b = b.reshape(out, r, 1, 1)
    return a.float().contiguous(), b.float().contiguous(), err


def extract_lora(model: PhaseModel, rank: int, diffs: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """peft-format LoRA (``unet.NAME.lora_A.weight``/``lora_B``; ``transformer.`` for transformers) of the phase's network − its base network, on the
    run's LoRA targets (the LCM-LoRA rule unless the run's adapter says otherwise).

    With ``diffs`` (ComfyUI's format), every other weight and bias the run changed is carried whole as its
    difference to the base (``NAME.diff``, ``NAME.diff_b``: ComfyUI adds them to the base's weights), so that a
    full run's file changes all that the run changed."""
    from lightning_distill.models.adapters import UNET_LORA_EXCLUDE, LoRA

    assert model.network is not None and model.base_network is not None
    trained = model.network.state_dict()
    base = model.base_network()
    exclude = model.lora_exclude if model.lora_exclude is not None else UNET_LORA_EXCLUDE
    targets = LoRA(LoRA.Config(rank=rank, exclude=exclude)).targets(base)
    base_state = base.state_dict()
    lora: dict[str, Tensor] = {}
    errors, untouched, carried = [], 0.0, 0
    target_weights = {f"{t}.weight" for t in targets}
    for key, value in base_state.items():
        delta = trained[key].float() - value.float()
        if key in target_weights:
            if delta.abs().max() <= 1e-12:
                continue
            a, b, err = lora_factors(delta, rank)
            name = key[: -len(".weight")]
            lora[f"{model.network_folder}.{name}.lora_A.weight"] = a
            lora[f"{model.network_folder}.{name}.lora_B.weight"] = b
            errors.append(err)
        elif delta.numel() and delta.abs().max() > 0:
            name, _, kind = key.rpartition(".")
            if diffs and kind in ("weight", "bias"):
                lora[f"{model.network_folder}.{name}.{'diff' if kind == 'weight' else 'diff_b'}"] = delta.contiguous()
                carried += 1
            else:
                untouched = max(untouched, float(delta.abs().max()))
    info = {
        "rank": rank,
        "layers": len(errors),
        "max_relative_error": max(errors, default=0.0),
        "max_change_outside_lora": untouched,
    }
    if diffs:
        info["diff_weights"] = carried
    if info["max_relative_error"] > 1e-3:
        log.warning(
            "LoRA export: rank %d leaves a relative error of up to %.3g (the merged LoRAs of the run add up to a "
            "higher rank); pass a larger --rank, or export --format diffusers for the exact weights",
            rank, info["max_relative_error"],
        )
    if untouched > 0:
        log.warning(
            "LoRA export: weights outside the LoRA targets changed (up to %.3g) and are not in the file; "
            "export --format diffusers (or --format comfyui, which carries them as differences) keeps them", untouched,
        )
    return lora, info


def to_comfyui(lora: dict[str, Tensor]) -> dict[str, Tensor]:
    """kohya/ComfyUI names: ``lora_unet_<path with _>.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha``
    for UNets; ``lora_transformer_<diffusers path with _>`` for transformers (ComfyUI maps diffusers names); a
    whole difference keeps its ``.diff`` / ``.diff_b`` suffix on the layer's name."""
    out: dict[str, Tensor] = {}
    for key, value in lora.items():
        folder, rest = key.split(".", 1)
        if rest.endswith((".diff", ".diff_b")):
            name, kind = rest.rsplit(".", 1)
            out[f"lora_{folder}_" + name.replace(".", "_") + f".{kind}"] = value
            continue
        name, kind = rest.rsplit(".lora_", 1)
        base = f"lora_{folder}_" + name.replace(".", "_")
        if kind == "A.weight":
            out[f"{base}.lora_down.weight"] = value
            out[f"{base}.alpha"] = torch.tensor(float(value.shape[0]))  # alpha = rank: scale 1
        else:
            out[f"{base}.lora_up.weight"] = value
    return out
