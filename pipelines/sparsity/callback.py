"""Gradual magnitude pruning on the training loop.

Usage (step = number of optimizer updates done so far; with gradient accumulation call these
only around real optimizer steps):

    cb = PruningCallback(model, cfg)                       # plain torch model
    cb = PruningCallback(model, cfg, enforcer=...)         # e.g. DeepSpeedMaskEnforcer(engine)
    for step in range(start, total):
        cb.on_step_begin(step)   # recompute masks if the schedule says so, mask the live weights
        ... forward / backward ...
        cb.before_step()         # right before optimizer.step() (keep: stored values back, pruned grads 0)
        ... optimizer.step() ...
        cb.on_step_end(step)     # mask the live weights again (zero: also the master copy and Adam state)
    cb.apply()                   # before a save or the export (idempotent)

Mask timing follows the reference: its scheduler steps after every optimizer update
(`api_utils.HFTrainerPruningCallback.on_step_end` -> `IterativePruningScheduler.step`), so its mask
for schedule step t is computed after update t + 1 from the weights that update left, i.e. here at the
beginning of step t + 1. Scores are the stored values under `pruned_weights: keep` (a pruned weight
whose stored magnitude ranks again comes back: `masks/regrown` counts them), the masked weights under
`zero`.

`state_dict()` / `load_state_dict()` carry masks (bool CPU tensors, by parameter name), the schedule
position and any stored values the engine's checkpoint does not hold.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import schedules
from .config import PruningConfig, ScheduleConfig
from .enforcer import MaskEnforcer, TorchMaskEnforcer
from .masks import compute_masks, pattern_masks
from .selection import validate_against_model

STATE_VERSION = 2  # 2: reference mask timing and counts, stored values (pofa 0.2)


class PruningCallback:
    def __init__(self, model: nn.Module, cfg: PruningConfig, enforcer: MaskEnforcer | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.cfg = cfg
        self.names = validate_against_model(cfg, model)
        self.keep = cfg.pruned_weights == "keep"
        self.enforcer: MaskEnforcer = enforcer or TorchMaskEnforcer(model, optimizer, keep=self.keep)
        self.masks: dict[str, Tensor] = {}  # empty until pruning starts: no per-step cost before
        self.last_update_step: int | None = None
        self.sparsity: float = 0.0  # target of the masks in force
        self.regrown: int = 0  # pruned entries the last mask update brought back

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
        index = schedule_index(sched, step)
        if index is None and not self.masks and sched.initial_sparsity > 0:
            # the reference computes a mask at the initial sparsity when pruning is set up
            self._install(compute_masks(self.enforcer.read_weights(self.names), sched.initial_sparsity, self.cfg),
                          step, sched.initial_sparsity)
            return True
        if index is None or step == self.last_update_step or not schedules.is_mask_update_step(sched, index):
            return False  # e.g. replaying the step a checkpoint was written at
        target = schedules.target_sparsity(sched, index)
        weights = self.enforcer.read_weights(self.names)
        if self.masks and not self.keep:  # zero: score the weights as the model sees them
            weights = {n: w * self.masks[n].to(w.device, w.dtype) for n, w in weights.items()}
        masks = compute_masks(weights, target, self.cfg)
        self.regrown = sum(int((~self.masks[n].to(m.device) & m).sum()) for n, m in masks.items()
                           if n in self.masks)
        self._install(masks, step, target)
        return True

    def before_step(self) -> None:
        """Right before the optimizer update (keep: the stored values take the update, pruned grads 0)."""
        if self.masks:
            self.enforcer.before_step()

    def on_step_end(self, step: int) -> None:
        """Re-apply masks after the optimizer step."""
        if self.masks:
            self.enforcer.enforce()

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

    def update_metrics(self) -> dict[str, float]:
        """What a mask update did: its target, the global and per-layer sparsity of the masks, the entries
        regrown. Logged at every update, so the charts draw the schedule's curve, not a point per evaluation."""
        return {**self.metrics(), "masks/regrown": float(self.regrown)}  # a count per update

    def masked(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A full state dict (name -> tensor) with every pruned entry exactly zero: what an export writes
        (under keep the gathered fp32 values are the stored ones)."""
        for name, keep in self.masks.items():
            if name in state:
                state[name] = state[name] * keep.to(state[name].device, state[name].dtype)
        return state

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "masks": {n: m.detach().to("cpu", torch.bool).clone() for n, m in self.masks.items()},
            "last_update_step": self.last_update_step,
            "sparsity": self.sparsity,
            "regrown": self.regrown,
            "config": self.cfg.model_dump(mode="json"),
            "stored": self.enforcer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and schedule position, and apply the masks at once."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pruning state version {state.get('version')!r} != {STATE_VERSION}: the checkpoint was "
                             "written by a pofa whose masks followed other semantics (before the reference's mask "
                             "timing and stored weights); redo the stage (--redo student)")
        masks = dict(state["masks"])
        unknown = sorted(set(masks) - set(self.names))
        if unknown:
            raise ValueError(f"pruning state has masks for parameters not selected by the recipe: {unknown[:5]}")
        self.last_update_step = state["last_update_step"]
        self.sparsity = float(state["sparsity"])
        self.regrown = int(state.get("regrown", 0))
        self.masks = {n: m.to(torch.bool) for n, m in masks.items()}
        self.enforcer.load_state_dict(dict(state.get("stored") or {}))
        if self.masks:
            self.enforcer.set_masks(self.masks)

    def _install(self, masks: dict[str, Tensor], step: int, target: float) -> None:
        self.masks = {n: m.to(torch.bool) for n, m in masks.items()}
        self.last_update_step = step
        self.sparsity = target
        self.enforcer.set_masks(self.masks)


def schedule_index(sched: ScheduleConfig, step: int) -> int | None:
    """The reference scheduler's step at the beginning of our step `step` (None: not yet counting).
    Cubic: one behind (it steps after each update); one-shot prunes before the first update, as the
    reference's one-shot scheduler does at initialisation."""
    if sched.kind == "cubic":
        return step - 1 if step >= 1 else None
    return step


def _pruned_fraction(masks: Mapping[str, Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m.bool()).sum()) for m in masks.values()) / total if total else 0.0
