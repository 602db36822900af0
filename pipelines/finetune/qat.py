"""Quantization-aware training to 8 bits on the pattern-locked sparse model, and its int8 export.

During training every pruned `nn.Linear` (the encoder's) computes with fake-quantized operands:
weights symmetric per output channel, inputs symmetric per tensor (dynamic range), both int8 on
the grid [-127, 127], with straight-through gradients. Zero maps to zero on a symmetric grid, so
the locked pattern survives quantization exactly. The export stores those layers as int8 weights
plus one fp32 scale per output channel; everything else (embeddings, LayerNorm, heads) stays fp32.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

QMAX = 127
SCHEME = "int8 symmetric; weights per output channel, activations per tensor (dynamic)"


def _fake_quant(x: Tensor, scale: Tensor) -> Tensor:
    q = torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale
    return x + (q - x).detach()  # straight-through estimator


def weight_scales(weight: Tensor) -> Tensor:
    """One scale per output row; an all-zero row gets scale 1 (its int8 values are all 0)."""
    top = weight.detach().abs().amax(dim=1, keepdim=True)
    return torch.where(top > 0, top / QMAX, torch.ones_like(top))


def _qat_forward(module: nn.Linear):
    def forward(x: Tensor) -> Tensor:
        top = x.detach().abs().amax()
        xq = _fake_quant(x, torch.where(top > 0, top / QMAX, torch.ones_like(top)))
        wq = _fake_quant(module.weight, weight_scales(module.weight))
        return F.linear(xq, wq, module.bias)
    return forward


def enable_qat(model: nn.Module, weight_names: Iterable[str]) -> list[str]:
    """Fake-quantize the Linear layers owning `weight_names` (parameter names ending in `.weight`)."""
    done = []
    modules = dict(model.named_modules())
    for name in weight_names:
        owner = modules.get(name.removesuffix(".weight"))
        if isinstance(owner, nn.Linear):
            owner.forward = _qat_forward(owner)  # instance attribute: the class stays untouched
            done.append(name)
    if not done:
        raise ValueError("finetune.qat: no Linear layer selected for quantization")
    return done


def export_int8(model_dir: str, weight_names: Iterable[str], out_name: str = "int8") -> dict[str, Any]:
    """Write `<model_dir>/<out_name>/` with the int8 weights, scales and a report; returns the report."""
    names = set(weight_names)
    state = load_file(os.path.join(model_dir, "model.safetensors"))
    packed: dict[str, Tensor] = {}
    fp32_bytes = int8_bytes = zeros_kept = pattern_zeros = nonzeros = 0
    for key, tensor in state.items():
        fp32_bytes += tensor.numel() * 4
        if key in names and tensor.dim() == 2:
            scale = weight_scales(tensor)
            q = torch.clamp(torch.round(tensor / scale), -QMAX, QMAX).to(torch.int8)
            packed[key] = q
            packed[f"{key}.scale"] = scale.squeeze(1).float()
            int8_bytes += q.numel() + scale.numel() * 4
            pattern_zeros += int((tensor == 0).sum())
            zeros_kept += int(((tensor == 0) & (q == 0)).sum())
            nonzeros += int((q != 0).sum())
        else:
            packed[key] = tensor.float().contiguous()
            int8_bytes += tensor.numel() * 4
    if zeros_kept != pattern_zeros:  # cannot happen on a symmetric grid; guards the export itself
        raise RuntimeError(f"int8 export lost {pattern_zeros - zeros_kept} pruned zeros")
    out = os.path.join(model_dir, out_name)
    os.makedirs(out, exist_ok=True)
    save_file(packed, os.path.join(out, "model.int8.safetensors"))
    quantized = [k for k in names if k in state]
    q_elems = sum(state[k].numel() for k in quantized)
    report = {"scheme": SCHEME, "quantized_layers": len(quantized),
              "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
              "file_bytes": os.path.getsize(os.path.join(out, "model.int8.safetensors")),
              "quantized_weight_sparsity": 1.0 - nonzeros / max(q_elems, 1),
              "pattern_zeros": pattern_zeros, "pattern_zeros_kept": zeros_kept,
              # encoder compression the paper quotes: fp32 dense vs int8 non-zeros (+1 byte of index each)
              "encoder_compression": (q_elems * 4) / max(2 * nonzeros, 1)}
    with open(os.path.join(out, "quantization.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def load_int8(model_dir: str, out_name: str = "int8") -> dict[str, Tensor]:
    """The dequantized fp32 state dict of an int8 export (for checks and for loading into a model)."""
    packed = load_file(os.path.join(model_dir, out_name, "model.int8.safetensors"))
    state = {}
    for key, tensor in packed.items():
        if key.endswith(".scale"):
            continue
        if tensor.dtype == torch.int8:
            state[key] = tensor.float() * packed[f"{key}.scale"].unsqueeze(1)
        else:
            state[key] = tensor
    return state
