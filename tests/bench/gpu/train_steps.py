"""The teacher stage's step and the student stage's KD step, as pofa's worker runs them
(`workers/train/base_worker.py: train_step`, `pretraining_worker.py: forward_loss`): one worker, one
micro-batch, the loss normalised by the global batch's counts (`GlobalNorm`), the engine from
`trainer.py`. The student is pruned by pofa's PruningCallback through the engine's mask enforcer:
the reference's cubic GMP squeezed into the warm-up (masks recomputed every step up to 90%), so the
timed steps run at the final sparsity with masks applied after every update; after them the masks
are checked exact. No data loader, evaluation, checkpoint or metric all-reduce: the step alone.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from pipelines.distillation import distillation_loss, teacher_logits
from pipelines.distillation_config import DistillationConfig
from pipelines.models.heads import accepted_inputs
from pipelines.sparsity import PruningCallback, PruningConfig
from pipelines.sparsity.allocation import uniform_counts
from pipelines.training.losses import GlobalNorm, pretraining_loss
from tests.bench.gpu.flops import mfu, model_flops
from tests.bench.gpu.shapes import Shape, build_model, make_batch
from tests.bench.gpu.timing import Plan, Timing, peak_memory_gib, reset_peak_memory, time_calls
from tests.bench.gpu.trainer import Trainer, close, make_trainer, train_config
from workers.train.streaming import counts_of

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")  # as workers/train/pretraining_worker.py
FINAL_SPARSITY = 0.9
MIN_WARMUP = 3  # the mask ramp ends one step before the timed steps


def _norm(batch: dict[str, Tensor]) -> GlobalNorm:
    targets, tokens, sequences = counts_of([batch]).tolist()
    return GlobalNorm(targets, tokens, sequences, scale=1.0)  # one worker, one micro-batch


def _rates(timing: Timing, shape: Shape, batch: dict[str, Tensor], flops_per_step: float,
           plan: Plan) -> dict[str, Any]:
    ms = timing.median_ms
    return {**timing.as_dict(), "tokens_per_s": shape.tokens / ms * 1000,
            "real_tokens_per_s": float(batch["attention_mask"].sum()) / ms * 1000,
            "flops_per_step": flops_per_step, "achieved_tflops": flops_per_step / ms / 1e9,
            "mfu": mfu(flops_per_step, ms, plan.peak_tflops)}


def _run(device: torch.device, plan: Plan, step: Callable[[int], Tensor], warmup: int) -> tuple[Timing, list[float]]:
    losses: list[Tensor] = []
    reset_peak_memory(device)
    timing = time_calls(lambda i: losses.append(step(i).detach()), device, warmup, plan.iters, plan.budget)
    return timing, [float(losses[0]), float(losses[-1])]


def measure_teacher_step(device: torch.device, shape: Shape, plan: Plan, deepspeed: bool = True) -> dict[str, Any]:
    """Teacher preparation: forward, MLM + NSP cross-entropy, backward, optimizer step."""
    model = build_model(shape, seed=0)
    flops = model_flops(model, shape.seq)
    trainer = make_trainer(model, train_config(shape.batch, device), device, deepspeed)
    batch = make_batch(shape, trainer.device)
    norm, inputs = _norm(batch), accepted_inputs(trainer.module, batch, MODEL_INPUTS)

    def step(_: int) -> Tensor:
        total, _mlm, _nsp = pretraining_loss(trainer(**inputs), batch, norm)
        trainer.backward(total)
        trainer.step()
        return total

    try:
        timing, losses = _run(device, plan, step, plan.warmup)
        memory = peak_memory_gib(device)
    finally:
        close(trainer)
    return {"engine": trainer.kind, "loss_first": losses[0], "loss_last": losses[-1], "peak_memory_gib": memory,
            **_rates(timing, shape, batch, flops.train_per_token * shape.tokens, plan)}


def pruning_config(ramp: int) -> PruningConfig:
    """Cubic GMP from 0 to FINAL_SPARSITY over `ramp` steps, masks recomputed at every step."""
    return PruningConfig.model_validate({"schedule": {
        "kind": "cubic", "policy_begin_step": 0, "policy_end_step": ramp, "begin_pruning_step": 0,
        "end_pruning_step": ramp, "pruning_frequency": 1, "initial_sparsity": 0.0, "final_sparsity": FINAL_SPARSITY}})


def check_masks(trainer: Trainer, pruning: PruningCallback) -> dict[str, Any]:
    """Exact: every layer prunes exactly its share at the final sparsity, and every pruned entry of the
    weights the forward sees is 0. Under `keep` the stored values (fp32 master copy) live on."""
    module = trainer.module
    shapes = {n: tuple(module.get_parameter(n).shape) for n in pruning.names}
    expected = uniform_counts(shapes, FINAL_SPARSITY, pruning.cfg.mask)
    wrong_counts = [n for n in pruning.names if n not in pruning.masks or int((~pruning.masks[n]).sum()) != expected[n]]
    live_nonzero = stored_nonzero = 0
    for name, keep in pruning.masks.items():
        live = module.get_parameter(name).detach()
        live_nonzero += int(live[~keep.to(live.device)].ne(0).sum())
        stored = trainer.stored(name)
        if stored is not None:
            stored_nonzero += int(stored[~keep.to(stored.device)].ne(0).sum())
    return {"layers": len(pruning.names), "target_sparsity": FINAL_SPARSITY, "mask_sparsity": pruning.metrics()["sparsity/global"],
            "counts_exact": not wrong_counts, "wrong_count_layers": wrong_counts[:5],
            "live_nonzero_at_pruned": live_nonzero, "stored_nonzero_at_pruned": stored_nonzero,
            "exact": not wrong_counts and live_nonzero == 0}


def measure_student_step(device: torch.device, shape: Shape, plan: Plan, deepspeed: bool = True) -> dict[str, Any]:
    """Student pruning: frozen bf16 teacher forward, student forward, KD loss (0.5 / 0.5, T = 2, the
    fused KL), backward, optimizer step, masks applied; then the masks checked exact."""
    student, teacher = build_model(shape, seed=0), build_model(shape, seed=1)
    flops = model_flops(student, shape.seq)
    trainer = make_trainer(student, train_config(shape.batch, device), device, deepspeed)
    # as BaseWorker.frozen_teacher: a plain module in the training precision, eval, no gradients
    teacher = teacher.to(device=trainer.device, dtype=torch.bfloat16).eval().requires_grad_(False)
    warmup = max(plan.warmup, MIN_WARMUP)
    cfg = pruning_config(ramp=warmup - 2)  # cubic steps are one behind: the last update lands at warmup - 1
    pruning = PruningCallback(trainer.module, cfg, enforcer=trainer.enforcer(keep=cfg.pruned_weights == "keep"))
    kd_cfg = DistillationConfig()
    batch = make_batch(shape, trainer.device)
    norm, inputs = _norm(batch), accepted_inputs(trainer.module, batch, MODEL_INPUTS)
    updates: list[int] = []

    def step(i: int) -> Tensor:
        if pruning.on_step_begin(i):
            updates.append(i)
        out = trainer(**inputs)
        loss = distillation_loss("pretraining", out, teacher_logits(teacher, inputs), batch, kd_cfg, norm)
        trainer.backward(loss.total)
        pruning.before_step()
        trainer.step()
        pruning.on_step_end(i)
        return loss.total

    try:
        timing, losses = _run(device, plan, step, warmup)
        memory = peak_memory_gib(device)
        masks = {**check_masks(trainer, pruning), "updates_at_steps": updates,
                 "timed_steps_without_update": all(u < warmup for u in updates)}
    finally:
        close(trainer)
    per_step = (flops.train_per_token + flops.forward_per_token) * shape.tokens  # + the teacher's forward
    return {"engine": trainer.kind, "loss_first": losses[0], "loss_last": losses[-1], "peak_memory_gib": memory,
            "masks": masks, **_rates(timing, shape, batch, per_step, plan)}
