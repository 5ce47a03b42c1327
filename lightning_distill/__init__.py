"""lightning-distill: progressive adversarial diffusion distillation (SDXL-Lightning) with Lightning Fabric."""

from .config import Spec, component
from .errors import RecipeError, UserError
from .method import Method, OptimizerSettings, Phase
from .registry import (
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
    SCHEDULES,
    STUDENTS,
    TEACHERS,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS", "BACKBONES", "CALLBACKS", "CODECS", "DATA", "DISCRIMINATORS", "FEATURES", "HEADS", "LOSSES", "METHODS", "METRICS",
    "OPTIMIZERS", "REGISTRIES", "SCHEDULES", "STUDENTS", "TEACHERS",
    "Method", "OptimizerSettings", "Phase", "RecipeError", "Spec", "UserError", "component",
]
