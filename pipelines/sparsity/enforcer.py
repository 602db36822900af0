"""Where masks are applied. The pruning callback only talks to this small protocol, so the same
callback drives a plain torch model (here) and a DeepSpeed engine (`workers/deepspeed_masks.py`).

Two semantics (`pruning.pruned_weights`):
- keep (Intel's reference, `pruning/methods/method.py` + `magnitude_method.py`): the forward sees
  `stored * mask`, the gradient of a pruned entry is zero, and the stored value and its optimizer
  state live on (Adam's momentum and weight decay still move it), so a later mask update that ranks
  it again brings it back. The live parameter holds the masked weight between steps; the stored
  values live in the optimizer's fp32 master copy where there is one (DeepSpeed ZeRO 1-3), or in a
  copy kept here (`StoredValues`) that is put back into the parameter for the optimizer update.
- zero (pofa before 0.2): pruned weights and their Adam moments are zeroed after every step.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

# Optimizer state that must follow the mask, or momentum revives pruned weights (Adam, SGD).
OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


class MaskEnforcer(Protocol):
    def read_weights(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Full fp32 values the masks are scored on: the stored values under `keep`
        (a collective call under DeepSpeed: all ranks)."""

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Install new bool masks (True = keep): the live weights become masked."""

    def before_step(self) -> None:
        """Right before the optimizer update (after the last backward of the step)."""

    def enforce(self) -> None:
        """After every optimizer step, and before a save or an export: idempotent."""

    def state_dict(self) -> dict[str, Tensor]:
        """Stored values that no engine checkpoint holds (empty where a master copy holds them)."""

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore them; called before `set_masks` on resume."""


class StoredValues:
    """`keep` where the parameter is the optimizer's only copy (plain torch, DeepSpeed ZeRO-0 fp32).

    Between steps the parameter holds `stored * mask` (what forward, evaluation, checkpoints and the
    export see) and `stored` the full values. `before_step` zeroes the pruned gradients and puts the
    stored values back, so the optimizer moves them exactly as the reference's moves `weight_original`;
    `after_step` keeps the result and masks the parameter again."""

    def __init__(self) -> None:
        self.stored: dict[str, Tensor] = {}
        self._live_is_stored = False

    def install(self, name: str, param: Tensor, keep: Tensor) -> None:
        if name not in self.stored:
            self.stored[name] = param.detach().clone()
        with torch.no_grad():
            param.copy_(self.stored[name] * keep)

    def read(self, name: str, param: Tensor) -> Tensor:
        return self.stored.get(name, param.detach())

    @torch.no_grad()
    def before_step(self, params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
        for name, p in params.items():
            grad = getattr(p, "grad", None)
            if grad is not None:
                grad.mul_(masks[name].to(grad.dtype))
            p.copy_(self.stored[name])
        self._live_is_stored = True

    @torch.no_grad()
    def after_step(self, params: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> None:
        """Keep what the optimizer made of the stored values (only after `before_step`: a save or an export
        between steps finds them kept already), then mask the parameter: idempotent."""
        for name, p in params.items():
            if self._live_is_stored:
                self.stored[name].copy_(p)
            p.mul_(masks[name].to(p.dtype))
        self._live_is_stored = False

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.stored.items()}

    def load_state_dict(self, state: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> None:
        self.stored = {n: state[n].to(params[n].device, params[n].dtype).clone() for n in state}
        self._live_is_stored = False


class TorchMaskEnforcer:
    """Masks a plain torch module and, when given, its torch optimizer's state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 state_keys: Iterable[str] = OPTIMIZER_STATE_KEYS, keep: bool = True) -> None:
        self.model = model
        self.optimizer = optimizer
        self.state_keys = tuple(state_keys)
        self.keep = keep
        self.values = StoredValues()
        self._masks: dict[str, Tensor] = {}

    def _params(self) -> dict[str, Tensor]:
        # resolve by name every time: wrappers may have re-created the parameter objects
        return {name: self.model.get_parameter(name) for name in self._masks}

    def read_weights(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {n: self.values.read(n, self.model.get_parameter(n)).detach().float().clone() for n in names}

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        self._masks = {}
        for name, keep in masks.items():
            p = self.model.get_parameter(name)
            # multiplying by a mask of the param's dtype is the cheapest per-step form
            self._masks[name] = keep.to(device=p.device, dtype=p.dtype)
            if self.keep:
                self.values.install(name, p, self._masks[name])
        if not self.keep:
            self.enforce()

    def before_step(self) -> None:
        if self.keep and self._masks:
            self.values.before_step(self._params(), self._masks)

    @torch.no_grad()
    def enforce(self) -> None:
        if self.keep:
            self.values.after_step(self._params(), self._masks)
            return
        state = self.optimizer.state if self.optimizer is not None else {}
        for name, p in self._params().items():
            mask = self._masks[name]
            p.mul_(mask)
            st = state.get(p)
            if st:
                for key in self.state_keys:
                    t = st.get(key)
                    if isinstance(t, Tensor) and t.shape == p.shape:
                        t.mul_(mask.to(t.dtype))

    def state_dict(self) -> dict[str, Tensor]:
        return self.values.state_dict() if self.keep else {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            self.values.load_state_dict(state, {n: self.model.get_parameter(n) for n in state})
