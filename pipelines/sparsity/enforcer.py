"""Where masks are applied. The pruning callback only talks to this small protocol, so the same
callback drives a plain torch model (here) and a DeepSpeed engine (`workers/deepspeed_masks.py`).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

# Optimizer state that must follow the mask, or momentum revives pruned weights (Adam, SGD).
OPTIMIZER_STATE_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer")


class MaskEnforcer(Protocol):
    def read_weights(self, names: Sequence[str]) -> dict[str, Tensor]:
        """Full fp32 values of the named weights (a collective call under DeepSpeed: all ranks)."""

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        """Install new bool masks (True = keep) and zero the pruned entries everywhere."""

    def enforce(self) -> None:
        """Zero the pruned entries again; called after every optimizer step."""


class TorchMaskEnforcer:
    """Masks a plain torch module and, when given, its torch optimizer's state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 state_keys: Iterable[str] = OPTIMIZER_STATE_KEYS) -> None:
        self.model = model
        self.optimizer = optimizer
        self.state_keys = tuple(state_keys)
        self._masks: dict[str, Tensor] = {}

    def read_weights(self, names: Sequence[str]) -> dict[str, Tensor]:
        return {n: self.model.get_parameter(n).detach().float() for n in names}

    def set_masks(self, masks: Mapping[str, Tensor]) -> None:
        self._masks = {}
        for name, keep in masks.items():
            p = self.model.get_parameter(name)
            # multiplying by a mask of the param's dtype is the cheapest per-step form
            self._masks[name] = keep.to(device=p.device, dtype=p.dtype)
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        state = self.optimizer.state if self.optimizer is not None else {}
        for name, mask in self._masks.items():
            # resolve by name every time: wrappers may have re-created the parameter objects
            p = self.model.get_parameter(name)
            p.mul_(mask)
            st = state.get(p)
            if st:
                for key in self.state_keys:
                    t = st.get(key)
                    if isinstance(t, Tensor) and t.shape == p.shape:
                        t.mul_(mask.to(t.dtype))
