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
    "Method", "OptimizerSettings", "Phase", "RecipeError", "Spec", "UserError", "component",
]
