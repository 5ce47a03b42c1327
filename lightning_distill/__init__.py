"""lightning-distill: progressive adversarial diffusion distillation (SDXL-Lightning) with Lightning Fabric."""

from lightning_distill.config.fields import Spec, component
from lightning_distill.errors import RecipeError, UserError
from lightning_distill.methods.base import Method, OptimizerSettings, Phase
from lightning_distill.config.registry import (
    ADAPTERS,
    BACKBONES,
    CALLBACKS,
    CODECS,
    DATA,
    DISCRIMINATORS,
    FEATURES,
    HEADS,
    LOSSES,
    METHODS,
    METRICS,
    OPTIMIZERS,
    REGISTRIES,
    REGULARIZERS,
    SCHEDULES,
    STUDENTS,
    TEACHERS,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS", "BACKBONES", "CALLBACKS", "CODECS", "DATA", "DISCRIMINATORS", "FEATURES", "HEADS", "LOSSES", "METHODS", "METRICS",
    "OPTIMIZERS", "REGISTRIES", "REGULARIZERS", "SCHEDULES", "STUDENTS", "TEACHERS",
    "Method", "OptimizerSettings", "Phase", "RecipeError", "SamplerTeacher", "Spec", "TransformerDenoiser",
    "TransformerTeacher", "TransformerTeacherConfig", "UserError", "VAECodec", "VAECodecConfig", "component",
]

_LAZY = {"SamplerTeacher": "lightning_distill.models.teacher", "TransformerDenoiser": "lightning_distill.models.transformer",
         "TransformerTeacher": "lightning_distill.models.transformer",
         "TransformerTeacherConfig": "lightning_distill.models.transformer",
         "VAECodec": "lightning_distill.codecs.vae", "VAECodecConfig": "lightning_distill.codecs.vae"}
"""Bases a family plugin subclasses, imported on first use (they import diffusers)."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_distill' has no attribute {name!r}")
