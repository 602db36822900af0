"""Gradual magnitude pruning on the training loop.

Usage (step = number of optimizer updates done so far; with gradient accumulation call these
only around real optimizer steps):

    cb = PruningCallback(model, cfg)                       # plain torch model
    cb = PruningCallback(model, cfg, enforcer=...)         # e.g. DeepSpeedMaskEnforcer(engine)
    for step in range(start, total):
        cb.on_step_begin(step)   # recompute masks if the schedule says so, apply them
        ... forward / backward / optimizer.step() ...
        cb.on_step_end(step)     # zero pruned entries again (weights, master copy, optimizer state)
    cb.apply()                   # before the final save (also done by every on_step_end)

`state_dict()` / `load_state_dict()` carry masks (bool CPU tensors, by parameter name) and the
schedule position; put them in the checkpoint next to the engine's own state.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import schedules
from .config import PruningConfig
from .enforcer import MaskEnforcer, TorchMaskEnforcer
from .masks import compute_masks, pattern_masks
from .selection import validate_against_model

STATE_VERSION = 1


class PruningCallback:
    def __init__(self, model: nn.Module, cfg: PruningConfig, enforcer: MaskEnforcer | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.cfg = cfg
        self.names = validate_against_model(cfg, model)
        self.enforcer: MaskEnforcer = enforcer or TorchMaskEnforcer(model, optimizer)
        self.masks: dict[str, Tensor] = {}  # empty until pruning starts: no per-step cost before
        self.last_update_step: int | None = None
        self.sparsity: float = 0.0  # target of the masks in force

    # -- training loop hooks -------------------------------------------------------------
    def on_step_begin(self, step: int) -> bool:
        """Update masks when scheduled (or lock the pattern on first use); True if they changed."""
        sched = self.cfg.schedule
        if sched.kind == "constant":
            if self.last_update_step is None:
                masks = pattern_masks(self.enforcer.read_weights(self.names))
                # a locked pattern's target is the sparsity it has, not the schedule's (unused) level
                self._install(masks, step, _pruned_fraction(masks))
                return True
            return False
        if step == self.last_update_step or not schedules.is_mask_update_step(sched, step):
            return False  # e.g. replaying the step a checkpoint was written at
        target = schedules.target_sparsity(sched, step)
        weights = self.enforcer.read_weights(self.names)
        if self.masks:  # score the weights as the model sees them
            weights = {n: w * self.masks[n].to(w.device, w.dtype) for n, w in weights.items()}
        self._install(compute_masks(weights, target, self.cfg), step, target)
        return True

    def on_step_end(self, step: int) -> None:
        """Re-apply masks after the optimizer step."""
        if self.masks:
            self.enforcer.enforce()

    # aliases for loops that name hooks around the optimizer step
    before_step = on_step_begin
    after_step = on_step_end

    def apply(self) -> None:
        """Zero pruned entries now (e.g. before writing the final model)."""
        if self.masks:
            self.enforcer.enforce()

    # -- reporting -----------------------------------------------------------------------
    def mask_sparsity(self) -> dict[str, float]:
        """Per-layer fraction of pruned entries according to the masks (0 before pruning)."""
        return {n: 1.0 - self.masks[n].float().mean().item() if n in self.masks else 0.0
                for n in self.names}

    def metrics(self) -> dict[str, float]:
        """Flat metrics for a tracker: target, global and per-layer sparsity."""
        out = {"sparsity/target": self.sparsity, "sparsity/global": _pruned_fraction(self.masks)}
        out.update({f"sparsity/layer/{n}": s for n, s in self.mask_sparsity().items()})
        return out

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "masks": {n: m.detach().to("cpu", torch.bool).clone() for n, m in self.masks.items()},
            "last_update_step": self.last_update_step,
            "sparsity": self.sparsity,
            "config": self.cfg.model_dump(mode="json"),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and schedule position, and apply the masks at once."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pruning state version {state.get('version')!r} != {STATE_VERSION}")
        masks = dict(state["masks"])
        unknown = sorted(set(masks) - set(self.names))
        if unknown:
            raise ValueError(f"pruning state has masks for parameters not selected by the recipe: {unknown[:5]}")
        self.last_update_step = state["last_update_step"]
        self.sparsity = float(state["sparsity"])
        self.masks = {n: m.to(torch.bool) for n, m in masks.items()}
        if self.masks:
            self.enforcer.set_masks(self.masks)

    def _install(self, masks: dict[str, Tensor], step: int, target: float) -> None:
        self.masks = {n: m.to(torch.bool) for n, m in masks.items()}
        self.last_update_step = step
        self.sparsity = target
        self.enforcer.set_masks(self.masks)


def _pruned_fraction(masks: Mapping[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m.bool()).sum()) for m in masks.values()) / total if total else 0.0
