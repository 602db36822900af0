"""Gradual magnitude pruning for Prune Once for All: config, schedules, masks, the training-loop
callback, the sparsity report and LR rewinding. Pure torch: no Ray, DeepSpeed or MLflow here.

The names below load their module on first use, so that reading a recipe (`pipelines.sparsity.config`:
the CLI, `pofa plan`) imports no torch."""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PruningCallback": "callback", "MaskConfig": "config", "PruningConfig": "config", "ScheduleConfig": "config",
    "MaskEnforcer": "enforcer", "TorchMaskEnforcer": "enforcer", "compute_masks": "masks",
    "prunable_weights": "report", "sparsity_report": "report", "write_report": "report",
    "is_mask_update_step": "schedules", "target_sparsity": "schedules",
    "select_parameters": "selection", "validate_against_model": "selection",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
