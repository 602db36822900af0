"""How a model-wide sparsity target is split over layers, as exact prune counts.

Counts are in pruning units: weights for unstructured masks, whole blocks for block masks.
- uniform (the paper's): every layer gets int(s * units) pruned units.
- erk (Erdős–Rényi-Kernel, Evci et al. 2020): density proportional to (rows + cols) / (rows * cols),
  layers that would exceed density 1 are kept dense and the rest rescaled; counts are rounded by
  largest remainder so that the total is exactly int(s * total units).
- global: one magnitude threshold over all layers; handled in `masks.compute_masks`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from .config import MaskConfig


def prune_count(units: int, sparsity: float) -> int:
    """int(sparsity * units), truncated as the reference's threshold count
    (`pruning/methods/methods_utils.py: calc_pruning_threshold`, `k = int(target_sparsity * n)`)."""
    return min(units, int(sparsity * units))


def unit_count(shape: Sequence[int], mask: MaskConfig) -> int:
    rows, cols = int(shape[0]), int(shape[1])
    if mask.kind == "block":
        return (rows // mask.block_shape[0]) * (cols // mask.block_shape[1])
    return rows * cols


def uniform_counts(shapes: Mapping[str, Sequence[int]], sparsity: float, mask: MaskConfig) -> dict[str, int]:
    return {name: prune_count(unit_count(s, mask), sparsity) for name, s in shapes.items()}


def erk_counts(shapes: Mapping[str, Sequence[int]], sparsity: float, mask: MaskConfig) -> dict[str, int]:
    units = {name: unit_count(s, mask) for name, s in shapes.items()}
    ratio = {name: (s[0] + s[1]) / (s[0] * s[1]) for name, s in shapes.items()}
    total = sum(units.values())
    target_keep = total - prune_count(total, sparsity)
    dense: set[str] = set()
    eps = 0.0
    while True:
        free = [n for n in units if n not in dense]
        if not free:
            break
        remaining = target_keep - sum(units[n] for n in dense)
        eps = remaining / sum(ratio[n] * units[n] for n in free)
        newly = {n for n in free if eps * ratio[n] > 1.0}
        if not newly:
            break
        dense |= newly
    keep_float = {n: float(units[n]) if n in dense else eps * ratio[n] * units[n] for n in units}
    keep = {n: min(units[n], math.floor(v)) for n, v in keep_float.items()}
    # Largest remainder: hand out what flooring lost, biggest fractions first, ties by name.
    short = target_keep - sum(keep.values())
    order = sorted(units, key=lambda n: (-(keep_float[n] - math.floor(keep_float[n])), n))
    for n in order:
        if short <= 0:
            break
        if keep[n] < units[n]:
            keep[n] += 1
            short -= 1
    return {n: units[n] - keep[n] for n in units}
