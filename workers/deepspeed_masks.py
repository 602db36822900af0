"""Pruning masks that stay exact under DeepSpeed (ZeRO 0/1/2/3, fp32/bf16).

`pruned_weights: keep` (the reference's semantics, the default): the module weights DeepSpeed runs the
forward with hold `stored * mask`, and DeepSpeed's fp32 master copy (ZeRO 1-3, bf16) holds the stored
values. A gradient hook on each pruned parameter zeroes the pruned entries of its gradient before
DeepSpeed accumulates, reduces or partitions it, so the stored values move only by Adam's momentum and
weight decay, as the reference's `weight_original`; after every step (DeepSpeed has copied the master
into the module weights) the module weights are masked again: a local multiply, no communication. Mask
updates score the stored values (`safe_get_full_fp32_param`). Without a master copy (ZeRO-0, fp32)
the stored values are kept here (`pipelines.sparsity.enforcer.StoredValues`) and travel in the pruning
part of the checkpoint; with one, they travel in DeepSpeed's optimizer state (and its universal form).

`pruned_weights: zero` (pofa before 0.2): zeroing the module weights is not enough: DeepSpeed writes its fp32 master copy back at the next
step, and Adam's moments revive pruned weights (deepspeedai/DeepSpeed#2424). After every
optimizer step this enforcer zeroes the pruned entries in the module parameters, the fp32 master
weights and the optimizer state (exp_avg, exp_avg_sq), using DeepSpeed's public accessors:

- ZeRO-3: `safe_get/set_local_fp32_param` and `safe_get/set_local_optimizer_state` on the rank's
  own partition (no communication), plus the rank's low-precision partition `param.ds_tensor`.
- ZeRO-1/2 and the bf16 optimizer: `safe_get/set_full_fp32_param` and
  `safe_get/set_full_optimizer_state` (the getters all-reduce over the data-parallel group, so
  every rank must call `enforce` at the same point, as the training loop does), plus the
  replicated module weight.
- no master copy (ZeRO-0, fp32): the module weight and the torch optimizer's state.
- ZeRO-0 with bf16/fp16 (DeepSpeed's FP16_Optimizer) keeps an fp32 copy that no public accessor
  reaches: refused with a ValueError when the enforcer is built (use stage >= 1).

Cost: the ZeRO-1/2 getters all-reduce full tensors (3 per pruned weight per step); ZeRO-3 works
on local partitions only. Tested on CPU/gloo with 2 ranks: tests/workers/test_deepspeed_masks.py.

Parameters are looked up by name on `engine.module` every time (never cached objects).
Use with `pipelines.sparsity.PruningCallback(engine.module, cfg, enforcer=DeepSpeedMaskEnforcer(engine))`.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from deepspeed import comm as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import Tensor

from pipelines.sparsity.enforcer import StoredValues

ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")

ZERO3, MASTER, PLAIN = "zero3", "master", "plain"


def _is_zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


class DeepSpeedMaskEnforcer:
    """`pipelines.sparsity.MaskEnforcer` for a DeepSpeed engine."""

    def __init__(self, engine: Any, state_keys: Iterable[str] = ADAM_STATE_KEYS, keep: bool = True) -> None:
        self.engine = engine
        self.state_keys = tuple(state_keys)
        self.keep = keep
        self._check_supported()
        # name -> (kind, mask in the layout of the copy enforce() edits, full mask)
        self._masks: dict[str, tuple[str, Tensor, Tensor]] = {}
        self._installed_at = -1  # engine.global_steps when the masks were installed
        self.values = StoredValues()  # keep without a master copy (ZeRO-0 fp32)
        self._grad_hooks: dict[str, Any] = {}

    def _check_supported(self) -> None:
        """Refuse set-ups whose master copy has no public accessor (fail before training, not
        with silently regrowing weights): ZeRO-0 with bf16/fp16 uses DeepSpeed's FP16_Optimizer,
        whose fp32 copy `safe_get_full_fp32_param` cannot reach. Collective: all ranks."""
        p = next((q for q in self.engine.module.parameters() if q.requires_grad), None)
        if p is None or _is_zero3(p) or p.dtype == torch.float32:
            return
        if safe_get_full_fp32_param(p) is None:
            raise ValueError(
                f"DeepSpeed optimizer {type(self.engine.optimizer).__name__} (zero_optimization.stage="
                f"{self.engine.zero_optimization_stage()}, {p.dtype}) exposes no fp32 master copy through "
                "deepspeed.utils.safe_get_full_fp32_param, so pruning masks cannot be enforced on it; use "
                "zero_optimization.stage >= 1 (or fp32)"
            )

    def _param(self, name: str) -> torch.nn.Parameter:
        return self.engine.module.get_parameter(name)

    def _kind(self, param: torch.nn.Parameter) -> str:
        """Collective for ZeRO-1/2: call on every rank (set_masks is)."""
        if _is_zero3(param):
            return ZERO3
        # ZeRO-1/2 and the bf16 optimizer keep an fp32 master copy; the public getter returns
        # None exactly when there is none (fp32 without ZeRO).
        return PLAIN if safe_get_full_fp32_param(param) is None else MASTER

    # -- MaskEnforcer protocol -----------------------------------------------------------------
    def read_weights(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Full fp32 weights (from the master copy when there is one). Collective: all ranks."""
        out: dict[str, Tensor] = {}
        for name in names:
            p = self._param(name)
            full = safe_get_full_fp32_param(p)  # None without a master copy
            out[name] = (full if full is not None else self.values.read(name, p)).float().clone()
        return out

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        self._masks = {}
        for name, keep in masks.items():
            p = self._param(name)
            kind = self._kind(p)
            if kind == ZERO3:
                # the rank's partition: a slice of the flattened parameter, padded to world * part
                group = getattr(p, "ds_process_group", None)
                part = p.ds_tensor.numel()
                rank, world = dist.get_rank(group=group), dist.get_world_size(group=group)
                flat = keep.reshape(-1).to("cpu", torch.bool)
                padded = torch.ones(max(part * world, flat.numel()), dtype=torch.bool)
                padded[: flat.numel()] = flat
                local = padded[rank * part : (rank + 1) * part].to(p.ds_tensor.device)
                self._masks[name] = (kind, local, keep.to(device=p.device, dtype=torch.bool))
            else:
                full = keep.to(device=p.device, dtype=torch.bool)
                self._masks[name] = (kind, full, full)
        self._installed_at = self.engine.global_steps
        if self.keep:
            self._install_keep()
            return
        # Weights and master copy now. The optimizer state is zeroed by the next `enforce`, after
        # the next step: DeepSpeed links the master-copy views of the optimizer state lazily at the
        # first step after start-up or `load_checkpoint`, and moments used by that one step only
        # move entries that `enforce` zeroes again right after it.
        self._enforce_all(with_state=False)

    def enforce(self) -> None:
        if self.keep:
            self._mask_live()
            return
        self._enforce_all(with_state=self.engine.global_steps > self._installed_at)

    def before_step(self) -> None:
        if self.keep:
            plain = self._plain()
            if plain:
                self.values.before_step({n: self._param(n) for n in plain}, {n: self._masks[n][1] for n in plain})

    def state_dict(self) -> dict[str, Tensor]:
        return self.values.state_dict() if self.keep else {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            self.values.load_state_dict(state, {n: self._param(n) for n in state})

    # -- keep ----------------------------------------------------------------------------------
    def _plain(self) -> list[str]:
        return [n for n, (kind, _, _) in self._masks.items() if kind == PLAIN]

    @torch.no_grad()
    def _install_keep(self) -> None:
        """The forward sees stored * new mask from now on: a regrown weight comes back with its stored
        value at once (not only after DeepSpeed's next master -> module copy). Collective at ZeRO 1-3."""
        for name, (kind, keep, full) in self._masks.items():
            p = self._param(name)
            if kind == PLAIN:
                self.values.install(name, p.data, keep.to(p.dtype))
                continue
            if name not in self._grad_hooks:
                # before DeepSpeed's post-accumulate hooks see it: the pruned entries' gradient is 0
                self._grad_hooks[name] = p.register_hook(self._grad_mask(name))
            if kind == ZERO3:
                local = safe_get_local_fp32_param(p).reshape(-1)
                lp = p.ds_tensor
                lp.data.reshape(-1)[: local.numel()].copy_(local.to(lp.dtype))
                if p.data.numel() == p.ds_numel:  # persistent (small) parameters stay gathered
                    p.data.copy_(safe_get_full_fp32_param(p).to(p.dtype).reshape(p.data.shape))
            else:
                p.data.copy_(safe_get_full_fp32_param(p).to(p.dtype))
        self._mask_live()

    def _grad_mask(self, name: str) -> Any:
        def hook(grad: Tensor) -> Tensor:
            full = self._masks[name][2]
            if grad.numel() != full.numel():  # never pass an unmasked gradient on silently
                raise RuntimeError(f"pruning: the gradient of {name} has {grad.numel()} entries, its mask "
                                   f"{full.numel()}: this DeepSpeed layout is not supported with pruned_weights=keep")
            return grad * full.to(grad.dtype).reshape(grad.shape)
        return hook

    @torch.no_grad()
    def _mask_live(self) -> None:
        """The weights the forward sees = stored * mask (the master copy keeps the stored values)."""
        plain = {}
        for name, (kind, keep, full) in self._masks.items():
            p = self._param(name)
            if kind == ZERO3:
                p.ds_tensor.data.mul_(keep.to(p.ds_tensor.dtype))
                if p.data.numel() == p.ds_numel:  # persistent (small) parameters stay gathered
                    p.data.mul_(full.to(p.dtype).reshape(p.data.shape))
            elif kind == MASTER:
                p.data.mul_(keep.to(p.dtype))
            else:
                plain[name] = p.data
        if plain:
            self.values.after_step(plain, {n: self._masks[n][1].to(t.dtype) for n, t in plain.items()})

    @torch.no_grad()
    def _enforce_all(self, with_state: bool) -> None:
        keys = self.state_keys if with_state else ()
        for name, (kind, keep, full) in self._masks.items():
            p = self._param(name)
            if kind == ZERO3:
                self._enforce_zero3(p, keep, full, keys)
            elif kind == MASTER:
                self._enforce_master(p, keep, keys)
            else:
                self._enforce_plain(p, keep, keys)

    # -- per layout --------------------------------------------------------------------------
    def _enforce_zero3(self, p: torch.nn.Parameter, keep: Tensor, full: Tensor, keys: tuple[str, ...]) -> None:
        lp = p.ds_tensor
        lp.data.mul_(keep.to(lp.dtype))
        if p.data.numel() == p.ds_numel:
            # persistent (small) parameters stay gathered between steps: mask the full copy too
            p.data.mul_(full.to(p.dtype).reshape(p.data.shape))
        _mask_fp32_and_moments(p, keep, keys, (safe_get_local_fp32_param, safe_set_local_fp32_param),
                               (safe_get_local_optimizer_state, safe_set_local_optimizer_state))

    def _enforce_master(self, p: torch.nn.Parameter, keep: Tensor, keys: tuple[str, ...]) -> None:
        p.data.mul_(keep.to(p.dtype))
        _mask_fp32_and_moments(p, keep, keys, (safe_get_full_fp32_param, safe_set_full_fp32_param),
                               (safe_get_full_optimizer_state, safe_set_full_optimizer_state))

    def _enforce_plain(self, p: torch.nn.Parameter, keep: Tensor, keys: tuple[str, ...]) -> None:
        p.data.mul_(keep.to(p.dtype))
        state = getattr(self.engine.optimizer, "state", {}).get(p) or {}
        for key in keys:
            t = state.get(key)
            if isinstance(t, Tensor) and t.shape == p.shape:
                t.mul_(keep.to(t.dtype))


def _mask_fp32_and_moments(p: torch.nn.Parameter, keep: Tensor, keys: tuple[str, ...], fp32: tuple, moments: tuple) -> None:
    """Zero the pruned entries of DeepSpeed's fp32 master copy and of each optimizer state, through its
    public (get, set) accessors: the full ones under ZeRO 1/2, the local partitions under ZeRO 3."""
    get_fp32, set_fp32 = fp32
    hp = get_fp32(p)
    if hp is not None:
        set_fp32(p, hp * keep.to(hp.device, hp.dtype))
    get_state, set_state = moments
    for key in keys:
        st = get_state(p, key)
        set_state(p, st * keep.to(st.device, st.dtype), key)
