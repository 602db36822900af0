"""Sparsity report of the prunable weights: global and per layer, plus pattern validity
(blocks / N:M), written as JSON and as a PNG bar chart per layer."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from pipelines.sparsity.report_files import report_paths

from .config import MaskConfig, PruningConfig
from .selection import select_parameters


def prunable_weights(model: nn.Module, cfg: PruningConfig) -> dict[str, Tensor]:
    return {n: model.get_parameter(n).detach() for n in select_parameters(model, cfg)}


def block_valid(weight: Tensor, block_shape: tuple[int, int]) -> bool:
    """Every zero lies in an all-zero block (the zero pattern is made of whole blocks)."""
    bh, bw = block_shape
    rows, cols = weight.shape
    if rows % bh or cols % bw:
        return False
    zero = (weight == 0).reshape(rows // bh, bh, cols // bw, bw)
    zeros_per_block = zero.sum(dim=(1, 3))
    return bool(((zeros_per_block == 0) | (zeros_per_block == bh * bw)).all())


def nm_valid(weight: Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive weights along the input dimension has at most n nonzeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(dim=1) <= n).all())


def sparsity_report(weights: Mapping[str, Tensor], mask: MaskConfig | None = None) -> dict[str, Any]:
    layers = []
    zeros_total = numel_total = 0
    for name, w in weights.items():
        w = w.detach()
        zeros = int((w == 0).sum())
        entry: dict[str, Any] = {"name": name, "shape": list(w.shape), "numel": w.numel(), "zeros": zeros,
                                 "sparsity": zeros / w.numel() if w.numel() else 0.0}
        if mask is not None and mask.kind == "block":
            entry["block_valid"] = block_valid(w, mask.block_shape)
        if mask is not None and mask.kind == "nm":
            entry["nm_valid"] = nm_valid(w, mask.n, mask.m)
        layers.append(entry)
        zeros_total += zeros
        numel_total += w.numel()
    report: dict[str, Any] = {
        "global_sparsity": zeros_total / numel_total if numel_total else 0.0,
        "prunable_numel": numel_total,
        "zeros": zeros_total,
        "mask_kind": mask.kind if mask is not None else None,
        "layers": layers,
    }
    if mask is not None and mask.kind == "block":
        report["block_shape"] = list(mask.block_shape)
        report["pattern_valid"] = all(entry["block_valid"] for entry in layers)
    elif mask is not None and mask.kind == "nm":
        report["nm"] = [mask.n, mask.m]
        report["pattern_valid"] = all(entry["nm_valid"] for entry in layers)
    return report


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike, stem: str = "sparsity") -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.png` into out_dir; return both paths."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    json_path, png_path = report_paths(out_dir, stem)
    json_path.write_text(json.dumps(report, indent=2))

    layers = report["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(layers) + 2), 4.5))
    ax.bar(range(len(layers)), [entry["sparsity"] for entry in layers], color="tab:blue")
    ax.axhline(report["global_sparsity"], color="tab:red", linestyle="--",
               label=f"global {report['global_sparsity']:.3f}")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([entry["name"] for entry in layers], rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    ax.set_title("sparsity per layer")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path
