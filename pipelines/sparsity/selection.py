"""Which parameters are pruned: `nn.Linear` weights whose names match the recipe's patterns.

Names are those of `model.named_parameters()` on the bare model (not a DeepSpeed/DDP wrapper),
and masks are always looked up by these names, never by stored parameter objects.
"""
from __future__ import annotations

import re

from torch import nn

from .config import KEY, PruningConfig


def param_shape(param: nn.Parameter) -> tuple[int, ...]:
    # Under ZeRO-3 the local tensor is an empty placeholder; ds_shape is the real shape.
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def select_parameters(model: nn.Module, cfg: PruningConfig) -> list[str]:
    """Names of prunable weights, in `named_modules` order."""
    include = [re.compile(p) for p in cfg.include]
    exclude = [re.compile(p) for p in cfg.exclude]
    names: list[str] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        if id(module.weight) in seen:  # tied weights are pruned once, under their first name
            continue
        seen.add(id(module.weight))
        if any(p.search(name) for p in include) and not any(p.search(name) for p in exclude):
            names.append(name)
    return names


def validate_against_model(cfg: PruningConfig, model: nn.Module) -> list[str]:
    """Check the recipe against the model before training; return the selected names.

    Raises ValueError naming the recipe key when the patterns select nothing, or when a block
    shape or N:M group size does not divide a selected layer.
    """
    names = select_parameters(model, cfg)
    if not names:
        raise ValueError(
            f"{KEY}.include={cfg.include} / {KEY}.exclude={cfg.exclude} select no nn.Linear weight "
            f"of {type(model).__name__}"
        )
    for name in names:
        rows, cols = param_shape(model.get_parameter(name))
        if cfg.mask.kind == "block":
            bh, bw = cfg.mask.block_shape
            if rows % bh or cols % bw:
                raise ValueError(
                    f"{KEY}.mask.block_shape={[bh, bw]} does not divide {name} of shape [{rows}, {cols}]"
                )
        if cfg.mask.kind == "nm" and cols % cfg.mask.m:
            raise ValueError(f"{KEY}.mask.m={cfg.mask.m} does not divide the input dimension of {name} ({cols})")
    return names
