"""What a recipe costs before it runs: memory per device and FLOPs per phase (``lightning-distill plan``)."""

from lightning_distill.plan.planner import GPUS, PhasePlan, gpu_spec, plan_recipe, plan_table

__all__ = ["GPUS", "PhasePlan", "gpu_spec", "plan_recipe", "plan_table"]
