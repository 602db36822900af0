"""The KD loss on the MLM head: pofa's chunked kernel (`pipelines/kd_kernel.py`) against the
straightforward `log_softmax` + `kl_div` form (bench_kd's `reference_kd_kl`), value and time.

Logits are bf16 as the bf16 student and teacher emit them, [batch * seq, vocab]; the KL runs over
every non-padding position (the reference's `mlm_positions: tokens`), T = 2. A call is the forward
and the backward to the student's logits, as in a training step.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from pipelines.distillation_config import DistillationConfig
from pipelines.kd_kernel import fused_kd_kl
from tests.bench.bench_kd import reference_kd_kl
from tests.bench.gpu.shapes import Shape, make_batch
from tests.bench.gpu.timing import Plan, peak_memory_gib, reset_peak_memory, time_calls

LossFn = Callable[[Tensor, Tensor, float, Tensor], Tensor]


def _logits(shape: Shape, device: torch.device, seed: int) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    # spread like a trained head's logits: softmax neither flat nor one-hot
    return (3 * torch.randn(shape.tokens, shape.vocab, generator=g, device=device)).to(torch.bfloat16)


def _value_and_grad(fn: LossFn, student: Tensor, teacher: Tensor, t: float, valid: Tensor) -> tuple[float, Tensor]:
    s = student.detach().requires_grad_(True)
    loss = fn(s, teacher, t, valid)
    loss.backward()
    return float(loss.detach()), s.grad


def measure_kd_kernel(device: torch.device, shape: Shape, plan: Plan) -> dict[str, Any]:
    temperature = DistillationConfig().temperature
    valid = make_batch(shape, device)["attention_mask"].reshape(-1).bool()
    student, teacher = _logits(shape, device, 0), _logits(shape, device, 1)
    rows: dict[str, Any] = {}
    values: dict[str, tuple[float, Tensor]] = {}
    for name, fn in (("kernel", fused_kd_kl), ("straightforward", reference_kd_kl)):
        values[name] = _value_and_grad(fn, student, teacher, temperature, valid)
        reset_peak_memory(device)
        timing = time_calls(lambda _: _value_and_grad(fn, student, teacher, temperature, valid), device,
                            plan.warmup, plan.iters, plan.budget)
        rows[name] = {**timing.as_dict(), "peak_memory_gib": peak_memory_gib(device)}
    (kernel, g_kernel), (plain, g_plain) = values["kernel"], values["straightforward"]
    return {
        "rows": int(valid.sum()), "vocab": shape.vocab, "temperature": temperature, "dtype": "bfloat16",
        "value_kernel": kernel, "value_straightforward": plain,
        "value_rel_diff": abs(kernel - plain) / max(abs(plain), 1e-30),
        "grad_max_abs_diff": float((g_kernel.float() - g_plain.float()).abs().max()),
        "kernel": rows["kernel"], "straightforward": rows["straightforward"],
        "speedup": rows["straightforward"]["median_ms"] / rows["kernel"]["median_ms"],
    }
