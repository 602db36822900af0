"""Magnitude masks. A mask is a bool tensor shaped like the weight: True keeps, False prunes.

Exact counts: a layer of n units pruned at sparsity s loses exactly int(s * n) units (weights
or whole blocks). Ties in magnitude are broken by position (lower flat index pruned first), so
the same weights always give the same mask on any device.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from . import allocation
from .config import MaskConfig, PruningConfig


def smallest_k(scores: Tensor, k: int) -> Tensor:
    """Bool tensor (flat) marking the k smallest scores; ties go to the lowest index."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(flat, dtype=torch.bool)
    threshold = torch.kthvalue(flat, k).values
    pruned = flat < threshold
    missing = k - int(pruned.sum())
    if missing > 0:  # fill from the ties at the threshold, in index order
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        pruned[ties] = True
    return pruned


def unit_scores(weight: Tensor, mask: MaskConfig) -> Tensor:
    """Magnitude per pruning unit: |w| per weight, or mean |w| per block ([rows/bh, cols/bw])."""
    w = weight.detach().abs().float()
    if mask.kind != "block":
        return w
    bh, bw = mask.block_shape
    rows, cols = w.shape
    return w.reshape(rows // bh, bh, cols // bw, bw).mean(dim=(1, 3))


def expand_units(unit_keep: Tensor, shape: torch.Size, mask: MaskConfig) -> Tensor:
    """Unit keep mask -> weight-shaped keep mask."""
    if mask.kind != "block":
        return unit_keep.reshape(shape)
    bh, bw = mask.block_shape
    return unit_keep.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1).reshape(shape)


def nm_keep_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """Keep the n largest of every m consecutive weights along the input dimension."""
    groups = weight.detach().abs().float().reshape(-1, m)
    # stable descending sort: among equal magnitudes the lower index is kept
    top = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    return keep.reshape(weight.shape)


def layer_keep_mask(weight: Tensor, pruned_units: int, mask: MaskConfig) -> Tensor:
    scores = unit_scores(weight, mask)
    keep = ~smallest_k(scores, pruned_units).reshape(scores.shape)
    return expand_units(keep, weight.shape, mask)


def compute_masks(weights: Mapping[str, Tensor], sparsity: float, cfg: PruningConfig) -> dict[str, Tensor]:
    """Masks for all prunable weights at a model-wide target `sparsity`, following cfg.allocation."""
    mask = cfg.mask
    if mask.kind == "nm":
        # N:M fixes the pattern; the schedule only decides when it is switched on.
        if sparsity <= 0.0:
            return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
        return {name: nm_keep_mask(w, mask.n, mask.m) for name, w in weights.items()}
    if cfg.allocation == "global":
        return _global_masks(weights, sparsity, mask)
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    if cfg.allocation == "erk":
        counts = allocation.erk_counts(shapes, sparsity, mask)
    else:
        counts = allocation.uniform_counts(shapes, sparsity, mask)
    return {name: layer_keep_mask(w, counts[name], mask) for name, w in weights.items()}


def _global_masks(weights: Mapping[str, Tensor], sparsity: float, mask: MaskConfig) -> dict[str, Tensor]:
    names = list(weights)
    scores = [unit_scores(weights[n], mask) for n in names]
    # one threshold over every layer: concatenate on one device, in name order (deterministic ties)
    device = scores[0].device
    flat = torch.cat([s.reshape(-1).to(device) for s in scores])
    pruned = smallest_k(flat, allocation.prune_count(flat.numel(), sparsity))
    out: dict[str, Tensor] = {}
    offset = 0
    for name, s in zip(names, scores):
        keep = ~pruned[offset : offset + s.numel()].reshape(s.shape)
        offset += s.numel()
        out[name] = expand_units(keep, weights[name].shape, mask).to(weights[name].device)
    return out


def pattern_masks(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Pattern lock: keep exactly the entries that are nonzero now."""
    return {name: w.detach() != 0 for name, w in weights.items()}
