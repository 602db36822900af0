"""The 2:4 student's Linear layers on PyTorch's semi-structured sparse kernels against dense.

The student is pofa's: BertForPreTraining from its builder, pruned by its PruningCallback with an
N:M mask (2 of every 4 consecutive weights along the input dimension, `pruning.mask.kind: nm`),
which is the layout `torch.sparse.to_sparse_semi_structured` compresses. For every distinct Linear
shape of the pruned layers, a bf16 `F.linear` over the batch's token positions, dense (the masked
weight) against each backend of torch's kernels: cuSPARSELt (torch's default) and CUTLASS
(`SparseSemiStructuredTensor._FORCE_CUTLASS`); then the whole student's forward, inference, with
every pruned Linear swapped. Inference only: the training step keeps dense weights and masks.
Torch's kernels are CUDA-only: on another device each backend is skipped with torch's own reason.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.models.heads import accepted_inputs, mlm_logits
from pipelines.sparsity import PruningCallback, PruningConfig
from tests.bench.gpu.shapes import Shape, build_model, make_batch
from tests.bench.gpu.timing import Plan, Skip, time_calls

BACKENDS = {"cusparselt": False, "cutlass": True}  # name -> SparseSemiStructuredTensor._FORCE_CUTLASS
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def pruned_student(shape: Shape, device: torch.device) -> tuple[nn.Module, PruningCallback]:
    """bf16 student with pofa's 2:4 masks installed (one-shot, before the first step)."""
    model = build_model(shape, seed=0).to(device=device, dtype=torch.bfloat16).eval()
    cfg = PruningConfig.model_validate({"schedule": {"kind": "one_shot", "begin_pruning_step": 0, "final_sparsity": 0.5},
                                        "mask": {"kind": "nm", "n": 2, "m": 4}})
    callback = PruningCallback(model, cfg)
    callback.on_step_begin(0)
    return model, callback


def is_two_four(model: nn.Module, masks: dict[str, Tensor]) -> bool:
    """Every group of 4 along the input dimension keeps exactly 2, and the live weight is 0 elsewhere."""
    for name, keep in masks.items():
        weight = model.get_parameter(name).detach()
        if not bool((keep.reshape(-1, 4).sum(dim=1) == 2).all()) or bool(weight[~keep.to(weight.device)].any()):
            return False
    return True


def to_semi_structured(weight: Tensor, backend: str) -> Tensor:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = BACKENDS[backend]  # read when the tensor is made, not per call
    try:
        return to_sparse_semi_structured(weight.contiguous())
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _rel_err(out: Tensor, ref: Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def linear_shapes(model: nn.Module, masks: dict[str, Tensor]) -> dict[tuple[int, int], list[str]]:
    """(out, in) -> the pruned Linear modules of that shape."""
    out: dict[tuple[int, int], list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in masks:
            out.setdefault(tuple(module.weight.shape), []).append(name)
    return out


@torch.no_grad()
def _time_linear(device: torch.device, shape: Shape, plan: Plan, module: nn.Linear) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape.tokens, module.in_features, generator=g, device=device).to(torch.bfloat16)
    dense = F.linear(x, module.weight, module.bias)
    row: dict[str, Any] = {"dense": time_calls(lambda _: F.linear(x, module.weight, module.bias), device,
                                               plan.warmup, plan.iters, plan.budget).as_dict(), "skipped": {}}
    for backend in BACKENDS:
        try:
            weight = to_semi_structured(module.weight.detach(), backend)
            err = _rel_err(F.linear(x, weight, module.bias), dense)
            timing = time_calls(lambda _: F.linear(x, weight, module.bias), device, plan.warmup, plan.iters,
                                plan.budget)
        except Skip:
            raise
        except Exception as exc:  # a kernel missing on this device or build: named, not fatal
            row["skipped"][backend] = _why(exc)
            continue
        row[backend] = {**timing.as_dict(), "max_rel_err": err,
                        "speedup": row["dense"]["median_ms"] / timing.median_ms}
    return row


@torch.no_grad()
def _time_forward(device: torch.device, shape: Shape, plan: Plan, model: nn.Module,
                  shapes: dict[tuple[int, int], list[str]], backend: str) -> dict[str, Any]:
    """The whole student's forward, dense, then with every pruned Linear on `backend`'s kernels."""
    inputs = accepted_inputs(model, make_batch(shape, device), MODEL_INPUTS)
    reference = mlm_logits(model(**inputs))
    dense = time_calls(lambda _: model(**inputs), device, plan.warmup, plan.iters, plan.budget)
    for names in shapes.values():
        for name in names:
            module = model.get_submodule(name)
            module.weight = nn.Parameter(to_semi_structured(module.weight.detach(), backend), requires_grad=False)
    err = _rel_err(mlm_logits(model(**inputs)), reference)
    sparse = time_calls(lambda _: model(**inputs), device, plan.warmup, plan.iters, plan.budget)
    return {"backend": backend, "dense": dense.as_dict(), "sparse": sparse.as_dict(), "max_rel_err": err,
            "speedup": dense.median_ms / sparse.median_ms}


def measure_sparse24(device: torch.device, shape: Shape, plan: Plan) -> dict[str, Any]:
    model, callback = pruned_student(shape, device)
    shapes = linear_shapes(model, callback.masks)
    result: dict[str, Any] = {"pattern_2_4": is_two_four(model, callback.masks), "tokens": shape.tokens,
                              "linears": {}, "skipped": {}}
    for (out_f, in_f), names in sorted(shapes.items()):
        row = _time_linear(device, shape, plan, model.get_submodule(names[0]))
        result["linears"][f"{out_f}x{in_f}"] = {"count": len(names), **row}
    # per forward: each shape's time times its count (what the encoder's Linear layers cost)
    for kind in ("dense", *BACKENDS):
        rows = result["linears"].values()
        if all(kind in r for r in rows):
            result[f"linears_per_forward_ms_{kind}"] = sum(r["count"] * r[kind]["median_ms"] for r in rows)
    working = [b for b in BACKENDS if f"linears_per_forward_ms_{b}" in result]
    if not working:
        result["skipped"]["student_forward"] = "no semi-structured backend ran on this device (reasons above)"
        return result
    try:
        result["student_forward"] = _time_forward(device, shape, plan, model, shapes, working[0])
    except Skip:
        raise
    except Exception as exc:
        result["skipped"]["student_forward"] = _why(exc)
    return result
