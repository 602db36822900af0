"""Model FLOPs per step, the device's peak bf16 rate, and model FLOPs utilisation (MFU).

FLOPs per token position (every position of the padded batch: the model computes them all):
    forward = 2 * N_tok + 2 * N_seq / seq + 4 * L * seq * h
    train   = 3 * forward                       (backward = 2 x forward)
N_tok: weights of every nn.Linear applied at each position (the encoder's, the MLM transform, the
MLM decoder tied to the word embeddings); N_seq: those applied once per sequence (pooler, NSP head);
4 * L * seq * h: the attention scores QK^T and the weighted sum AV, 2 * seq * h each per layer.
Embedding look-ups, LayerNorm, softmax and GELU are left out (under 1% at BERT-Base). The KD
student step adds one teacher forward. A pruned student still runs dense kernels: its FLOPs are dense.
MFU = model FLOPs per step / step time / peak.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

# Vendor datasheets, dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s, matched in this order
# against torch.cuda.get_device_name(): the more specific names first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("H800", 989.4), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A30", 165.0),
    ("RTX 4090", 165.2), ("RTX A6000", 154.8),
)
PER_SEQUENCE = ("pooler.dense", "cls.seq_relationship")  # applied to [CLS] only


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where it came from); (None, why) for an unknown device."""
    if override:
        return override, "--peak-tflops"
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value, f"datasheet ({key})"
    return None, f"unknown device {device_name!r}: pass --peak-tflops"


@dataclass(frozen=True)
class ModelFlops:
    forward_per_token: float
    train_per_token: float
    linear_params: int  # N_tok + N_seq


def model_flops(model: nn.Module, seq: int) -> ModelFlops:
    """Per token position, from the model's own Linear layers and its config (the formula above)."""
    per_token = per_seq = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            if name.endswith(PER_SEQUENCE):
                per_seq += module.weight.numel()
            else:
                per_token += module.weight.numel()
    cfg = model.config
    forward = 2 * per_token + 2 * per_seq / seq + 4 * cfg.num_hidden_layers * seq * cfg.hidden_size
    return ModelFlops(forward_per_token=forward, train_per_token=3 * forward, linear_params=per_token + per_seq)


def mfu(flops_per_step: float, step_ms: float, peak: float | None) -> float | None:
    """Achieved / peak; `peak` in TFLOP/s."""
    if not peak or step_ms <= 0:
        return None
    return flops_per_step / (step_ms / 1000) / (peak * 1e12)


def matmul_tflops(device: torch.device, n: int, iters: int = 10) -> float:
    """A square bf16 matrix product's rate: the ceiling the device reaches here (not the datasheet's)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12
