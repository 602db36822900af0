"""A chunked KL(teacher_T || student_T) * T^2 with its gradient computed in the same pass.

The straightforward form (`F.log_softmax` of both sides, `F.kl_div`, autograd) makes about ten
passes over [rows, vocab] tensors in main memory and keeps several of them alive until the backward:
on the MLM head (vocab 30522, every token of the batch) that costs more than the plain step's loss. Here
each block of rows is read once into a cache-sized fp32 buffer, both softmaxes, the per-row KL and
the gradient (softmax_s - softmax_t) / T * T^2 / divisor are formed there, and the gradient is
written once into the one [rows, vocab] tensor the backward hands on. The teacher side needs no
gradient and none is kept for it.

Same value as `F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True, "sum") / divisor
* T^2` (the per-element terms are the same expression; row sums are accumulated in fp64).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# elements per block. CPU: 512 KB of fp32 (4 rows of a 30522 vocabulary), so a block's few buffers stay
# in the cache (measured best of 2^16..2^20 on one core). GPU: 64 MB, so a batch is a handful of blocks (kernel launches, not bandwidth, bound there).
_BLOCK_ELEMENTS = 1 << 17
_BLOCK_ELEMENTS_GPU = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _KLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, rows: Optional[Tensor], temperature: float,
                divisor: float) -> Tensor:
        classes = student.shape[1]
        dtype = _compute_dtype(student.dtype)
        n = student.shape[0] if rows is None else rows.numel()
        need_grad = ctx.needs_input_grad[0]
        # rows not selected keep a zero gradient
        grad = None
        if need_grad:
            grad = torch.empty_like(student) if rows is None else torch.zeros_like(student)
        inv_t = 1.0 / temperature
        grad_scale = temperature / divisor  # d(T^2 KL / divisor) / d s = (p_s - p_t) * T / divisor
        on_cpu = student.device.type == "cpu"
        acc = torch.float64 if student.device.type in ("cpu", "cuda") else torch.float32  # MPS has no fp64
        total = torch.zeros((), dtype=acc, device=student.device)
        block = max(1, (_BLOCK_ELEMENTS if on_cpu else _BLOCK_ELEMENTS_GPU) // max(classes, 1))
        for start in range(0, n, block):
            stop = min(start + block, n)
            if rows is None:
                s, t = student[start:stop], teacher[start:stop]
            else:
                idx = rows[start:stop]
                s, t = student.index_select(0, idx), teacher.index_select(0, idx)
            log_p_s = F.log_softmax(s.to(dtype) * inv_t, dim=-1)
            log_p_t = F.log_softmax(t.to(dtype) * inv_t, dim=-1)
            p_t = log_p_t.exp()
            # p_t (log p_t - log p_s), as F.kl_div with log_target
            total += log_p_t.sub_(log_p_s).mul_(p_t).sum(dim=-1, dtype=acc).sum()
            if need_grad:
                g = log_p_s.exp_().sub_(p_t).mul_(grad_scale)  # (p_s - p_t) * T / divisor
                if rows is None:
                    grad[start:stop].copy_(g)
                else:
                    grad.index_copy_(0, idx, g.to(grad.dtype))
        ctx.save_for_backward(grad)
        return (total * (temperature * temperature / divisor)).to(dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        return grad * grad_output.to(grad.dtype), None, None, None, None


def fused_kd_kl(student: Tensor, teacher: Tensor, temperature: float, valid: Optional[Tensor] = None,
                divisor: Optional[float] = None) -> Tensor:
    """Sum over the selected rows of KL(softmax(teacher / T) || softmax(student / T)) * T^2, divided
    by `divisor` (default: the number of selected rows). Logits [..., C]; `valid` ([...], bool) selects
    rows; the teacher gets no gradient. Half-precision logits are computed in fp32; the gradient
    comes back in the student's dtype."""
    classes = student.shape[-1]
    s = student.reshape(-1, classes)
    t = teacher.detach().reshape(-1, classes)
    if not s.is_contiguous():
        s = s.contiguous()
    rows = None
    if valid is not None:
        keep = valid.reshape(-1).to(torch.bool)
        if not bool(keep.all()):
            rows = keep.nonzero().squeeze(-1)
    n = s.shape[0] if rows is None else rows.numel()
    if n == 0:
        return student.sum() * 0.0  # keeps the graph and the device
    return _KLFunction.apply(s, t, rows, float(temperature), float(divisor or n))
