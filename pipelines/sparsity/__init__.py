"""Gradual magnitude pruning for Prune Once for All: config, schedules, masks, the training-loop
callback, the sparsity report and LR rewinding. Pure torch: no Ray, DeepSpeed or MLflow here."""
from .callback import PruningCallback
from .config import MaskConfig, PruningConfig, ScheduleConfig
from .enforcer import MaskEnforcer, TorchMaskEnforcer
from .masks import compute_masks
from .report import prunable_weights, sparsity_report, write_report
from .schedules import is_mask_update_step, target_sparsity
from .selection import select_parameters, validate_against_model

__all__ = [
    "MaskConfig", "MaskEnforcer", "PruningCallback", "PruningConfig", "ScheduleConfig", "TorchMaskEnforcer",
    "compute_masks", "is_mask_update_step", "prunable_weights", "select_parameters", "sparsity_report",
    "target_sparsity", "validate_against_model", "write_report",
]
