"""Published architecture configs of the base models the shipped recipes name (no weights), so that
``lightning-distill plan`` works offline: within :func:`offline_configs` a hub id below is read from here instead
of the hub. A local folder's own ``config.json`` always wins; training always reads the hub's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 128, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
}
_SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
_SD35_MEDIUM = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
}
_FLUX_DEV = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19,
    "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
_DISCRETE = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

KNOWN: dict[tuple[str, str], dict[str, Any]] = {
    ("stabilityai/stable-diffusion-xl-base-1.0", "unet"): _SDXL_UNET,
    ("stabilityai/stable-diffusion-xl-base-1.0", "scheduler"): _DISCRETE,
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "unet"): _SD15_UNET,
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "scheduler"): {**_DISCRETE, "_class_name": "PNDMScheduler"},
    ("stabilityai/stable-diffusion-3.5-medium", "transformer"): _SD35_MEDIUM,
    ("stabilityai/stable-diffusion-3.5-medium", "scheduler"): _FLOW,
    ("black-forest-labs/FLUX.1-dev", "transformer"): _FLUX_DEV,
    ("black-forest-labs/FLUX.1-dev", "scheduler"): {**_FLOW, "use_dynamic_shifting": True, "base_shift": 0.5,
                                                    "max_shift": 1.15, "base_image_seq_len": 256,
                                                    "max_image_seq_len": 4096},
}
"""(hub id, subfolder) -> config.json of that model, as published."""


_OFFLINE = [False]


@contextmanager
def offline_configs() -> Iterator[None]:
    """Within: configs of the hub ids in :data:`KNOWN` come from here (``plan``)."""
    _OFFLINE.append(True)
    try:
        yield
    finally:
        _OFFLINE.pop()


def register_config(pretrained: str, subfolder: str, config: dict[str, Any]) -> None:
    """Add a base model's published config (``config.json`` of ``pretrained/subfolder``) for ``plan`` to read
    offline: what a family plugin calls for the hub ids its recipes name."""
    KNOWN[(pretrained, subfolder)] = dict(config)


def known_config(pretrained: str, subfolder: str) -> dict[str, Any] | None:
    """Inside :func:`offline_configs`, the published config of a known base model's part; else None."""
    found = KNOWN.get((pretrained, subfolder)) if _OFFLINE[-1] else None
    return dict(found) if found is not None else None


def network_config(cls: Any, pretrained: str, subfolder: str) -> dict[str, Any]:
    """A network's ``config.json``: from a local folder, else the published config of a known base model (no
    download: :data:`KNOWN`, within :func:`offline_configs`), else from the hub."""
    from pathlib import Path

    from lightning_distill.errors import UserError

    local = Path(pretrained).expanduser()
    if not (local / subfolder).is_dir() and (known := known_config(pretrained, subfolder)) is not None:
        return known
    try:
        return cls.load_config(str(local) if local.exists() else pretrained, subfolder=subfolder)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of {cls.__name__} from {pretrained!r}/{subfolder}: {err}") from err
