"""The per-worker training function that Ray Train runs: DeepSpeed engine, shard, steps,
validation, checkpoints and export. Every rank runs the same sequence of collectives and calls
`ray.train.report` at the same steps (only at checkpoints), or Ray Train would hang.

Step convention: `step` counts completed optimizer updates. Step `s` reads the micro-batches at the
data cursor, uses LR `lr_fn(s)`, and pruning hooks get `s` (on_step_begin) and `s` (on_step_end).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Optional

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from pipelines.data.collator import collate
from pipelines.distillation import distillation_loss, teacher_logits
from pipelines.models.build import build_pretraining_model, load_pretraining_model
from pipelines.sparsity.callback import PruningCallback
from pipelines.training.losses import metrics_from_counts, pretraining_counts, pretraining_loss
from pipelines.training.schedule import make_lr_fn
from workers.train import checkpoint as ckpt
from workers.train import state as st
from workers.train.context import SafeTracker, all_reduce_sum, barrier, broadcast_from_rank0, logger
from workers.train.data import DataCursor, RankData, eval_batches, load_shard
from workers.train.engine import build_engine, set_learning_rate
from workers.train.export import export_model, gather_full_state
from workers.train.inputs import collator_settings, load_tokenizer, read_manifest
from workers.train.progress import Progress
from workers.train.spec import TrainSpec

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def batch_seed(seed: int, rank: int, step: int, micro: int, purpose: int = 0) -> int:
    """Masking seed of one micro-batch: a pure function, so a resumed step redraws the same masks."""
    entropy = [seed, rank, step, micro, purpose]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class Worker:
    """State of one Ray Train worker for one attempt of a stage."""

    def __init__(self, spec: TrainSpec, rank: int, world_size: int, device: torch.device,
                 in_ray: bool = True) -> None:
        started = time.perf_counter()
        self.spec, self.cfg = spec, spec.train
        self.rank, self.world, self.device, self.in_ray = rank, world_size, device, in_ray
        if self.world != self.cfg.num_workers:
            raise RuntimeError(f"{self.world} workers started, the recipe says {self.cfg.num_workers}")
        self.is_rank0 = self.rank == 0
        self.seed = spec.seed_value
        self.timings: dict[str, Any] = {"checkpoint_save_s": []}
        if self.is_rank0:
            os.makedirs(spec.checkpoint_dir, exist_ok=True)
        self.tracker = SafeTracker(spec.tracker, spec.metrics_path, self.is_rank0)

        self.tokenizer = load_tokenizer(spec.tokenizer_dir)
        self.settings = collator_settings(self.tokenizer, read_manifest(spec.manifest_path))
        model = self._build_model()
        self.model_config = model.config
        self.teacher = self._build_teacher()
        self.engine = build_engine(model, self.cfg)
        # from_pretrained returns a model in eval mode: without this, dropout would stay off until the
        # first evaluation switches it on, and a resumed run would differ from an uninterrupted one
        self.engine.train()
        self.pruning: Optional[PruningCallback] = None
        if spec.pruning is not None:
            from workers.deepspeed_masks import DeepSpeedMaskEnforcer  # DeepSpeed-side mask enforcement

            self.pruning = PruningCallback(self.engine.module, spec.pruning,
                                           enforcer=DeepSpeedMaskEnforcer(self.engine))
        self.lr_fn = make_lr_fn(self.cfg, spec.pruning)
        self.data = RankData(load_shard(spec.train_data_dir, self.rank, self.world),
                             self.cfg.samples_per_rank_per_step, self.cfg.micro_batch_size, self.seed, self.rank)
        self.val_table = load_shard(spec.validation_data_dir, self.rank, self.world)
        torch.manual_seed(self.seed * 1000 + self.rank)  # dropout differs per rank; restored on resume
        self.step, self.cursor = 0, DataCursor()
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: Optional[str] = None
        self.timings["worker_init_s"] = time.perf_counter() - started

    # -- set-up --------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        if self.spec.init_dir is not None:
            return load_pretraining_model(self.spec.init_dir)
        assert self.spec.model is not None
        return build_pretraining_model(self.spec.model, vocab_size=len(self.tokenizer),
                                       pad_token_id=self.tokenizer.pad_token_id, seed=self.seed)

    def _build_teacher(self) -> Optional[torch.nn.Module]:
        """Frozen teacher for the student: plain module, eval mode, no grads, no optimizer state."""
        if self.spec.stage != "student":
            return None
        teacher = load_pretraining_model(self.spec.init_dir)  # type: ignore[arg-type]
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision, torch.float32)
        teacher = teacher.to(device=self.device, dtype=dtype).eval()
        teacher.requires_grad_(False)
        return teacher

    # -- resume --------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest verified checkpoint (rank 0 chooses, all load); returns the start step."""
        choice = None
        if self.is_rank0:
            found = ckpt.latest_valid_checkpoint(self.spec.checkpoint_dir, warn=logger.warning)
            choice = found[1] if found else None
        choice = broadcast_from_rank0(choice)
        if choice is not None:
            started = time.perf_counter()
            self._load(choice)
            self.timings["checkpoint_load_s"] = time.perf_counter() - started
        if self.is_rank0:
            with open(os.path.join(self.spec.stage_dir, "attempts.jsonl"), "a") as f:
                f.write(json.dumps({"start_step": self.step, "checkpoint": choice, "time": time.time()}) + "\n")
            self.tracker.tags({f"{self.spec.stage}.start_step": str(self.step)})  # the latest attempt's
        return self.step

    def _load(self, folder: str) -> None:
        trainer_state = st.load_trainer_state(folder)
        _, client = self.engine.load_checkpoint(folder, tag=ckpt.DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {folder}")
        self.step = int(trainer_state["step"])
        self.cursor = st.load_rank_state(folder, self.rank, self.world)
        pruning_state = st.load_pruning_state(folder)
        if self.pruning is not None and pruning_state is not None:
            self.pruning.load_state_dict(pruning_state)  # re-applies the masks (collective)
        self.last_checkpoint = folder

    # -- training ------------------------------------------------------------------------------
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        out = self.engine(**inputs)
        if self.teacher is None:
            total, mlm, nsp = pretraining_loss(out, batch)
            return total, {"loss": total, "loss/mlm": mlm, "loss/nsp": nsp}
        t_out = teacher_logits(self.teacher, inputs)
        dl = distillation_loss("pretraining", out, t_out, batch, self.spec.distillation)  # type: ignore[arg-type]
        return dl.total, {"loss": dl.total, "loss/hard": dl.hard, "loss/kd": dl.kd}

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        if self.pruning is not None:
            self.pruning.on_step_begin(self.step)
        lr = self.lr_fn(self.step)
        set_learning_rate(self.engine, lr)
        sums: Optional[torch.Tensor] = None
        names: list[str] = []
        for micro, rows in enumerate(self.data.step_batches(self.cursor)):
            gen = torch.Generator().manual_seed(batch_seed(self.seed, self.rank, self.step, micro))
            batch = {k: v.to(self.device) for k, v in collate(rows, self.settings, gen).items()}
            loss, parts = self._forward_loss(batch)
            self.engine.backward(loss)
            self.engine.step()
            names = list(parts)
            values = torch.stack([p.detach().float().cpu() for p in parts.values()]).double()
            sums = values if sums is None else sums + values
        if self.pruning is not None:
            self.pruning.on_step_end(self.step)
        assert sums is not None
        mean = all_reduce_sum(sums) / (self.world * self.cfg.grad_accum_steps)
        self.step += 1
        self.cursor = self.data.advance(self.cursor)
        elapsed = time.perf_counter() - started
        metrics = {n: float(v) for n, v in zip(names, mean.tolist())}
        metrics.update({"lr": lr, "throughput/samples_per_s": self.cfg.global_batch_size / max(elapsed, 1e-9),
                        "epoch": float(self.cursor.epoch)})
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """val/* on each rank's validation shard (same batches every time), summed over ranks."""
        self.engine.eval()
        counts = torch.zeros(6, dtype=torch.float64)
        gen_seed = batch_seed(self.seed, self.rank, 0, 0, purpose=1)
        gen = torch.Generator().manual_seed(gen_seed)  # fixed masks: evaluations are comparable
        for rows in eval_batches(self.val_table, self.cfg.micro_batch_size, self.cfg.eval_batches):
            batch = {k: v.to(self.device) for k, v in collate(rows, self.settings, gen).items()}
            out = self.engine(**{k: batch[k] for k in MODEL_INPUTS})
            counts += pretraining_counts(out, batch).cpu()
        self.engine.train()
        metrics = metrics_from_counts(all_reduce_sum(counts))
        if self.pruning is not None:
            metrics.update(self.pruning.metrics())
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Temp folder -> every rank writes -> rank 0 verifies, renames, prunes -> report to Ray Train."""
        started = time.perf_counter()
        root = self.spec.checkpoint_dir
        tmp = os.path.join(root, ckpt.tmp_dir_name(self.step))
        final = os.path.join(root, ckpt.step_dir_name(self.step))
        if self.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        if self.pruning is not None:
            self.pruning.apply()  # checkpoints written before re-masking would not be sparse
        self.engine.save_checkpoint(tmp, tag=ckpt.DS_TAG, client_state={"pofa_step": self.step})
        st.save_rank_state(tmp, self.rank, self.world, self.step, self.cursor)
        if self.is_rank0:
            st.save_trainer_state(tmp, {"step": self.step, "stage": self.spec.stage, "world_size": self.world,
                                        "global_batch_size": self.cfg.global_batch_size, "seed": self.seed,
                                        "samples_seen": self.step * self.cfg.global_batch_size})
            if self.pruning is not None:
                st.save_pruning_state(tmp, self.pruning.state_dict())
        barrier()
        problem = None
        if self.is_rank0:
            ckpt.write_manifest(tmp, self.step, self.world)
            problem = ckpt.verify_checkpoint(tmp)
            if problem is None:
                ckpt.finalize(tmp, final)
                ckpt.prune_checkpoints(root, self.cfg.keep_checkpoints)
        problem = broadcast_from_rank0(problem)
        if problem is not None:
            raise RuntimeError(f"checkpoint at step {self.step} failed verification: {problem}")
        self.last_checkpoint = final
        self.tracker.flush()
        self.timings["checkpoint_save_s"].append(time.perf_counter() - started)
        if self.in_ray:
            self._report(metrics, final)

    def _report(self, metrics: dict[str, float], final: str) -> None:
        """Same number of calls on every rank; only rank 0 attaches the (pointer) checkpoint."""
        payload = {k: v for k, v in metrics.items() if not k.startswith("sparsity/layer/")}
        payload["step"] = self.step
        if not self.is_rank0:
            ray.train.report(payload)
            return
        with tempfile.TemporaryDirectory() as pointer:
            with open(os.path.join(pointer, "pofa_checkpoint.json"), "w") as f:
                json.dump({"step": self.step, "path": os.path.abspath(final)}, f)
            ray.train.report(payload, checkpoint=Checkpoint.from_directory(pointer),
                             checkpoint_dir_name=ckpt.step_dir_name(self.step))

    # -- end -----------------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        if self.pruning is not None:
            self.pruning.apply()  # training may end between mask updates
        full = gather_full_state(self.engine)
        report: dict[str, Any] = {}
        if self.is_rank0:
            report = export_model(full, self.model_config, self.spec.tokenizer_dir, self.spec.model_dir,
                                  self.spec.pruning)
            self.tracker.artifact(self.spec.model_dir, "model")
        barrier()
        return report

    def teacher_is_frozen(self) -> bool:
        if self.teacher is None:
            return True
        return all(not p.requires_grad and p.grad is None for p in self.teacher.parameters())


def _check_fault(spec: TrainSpec, rank: int, step: int) -> None:
    fault = spec.fault
    if fault is not None and fault.rank == rank and fault.step == step and not os.path.exists(fault.marker):
        with open(fault.marker, "w") as f:
            f.write(str(step))
        if fault.kind == "stall":
            time.sleep(3600)
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker and attempt)."""
    spec: TrainSpec = config["spec"]
    started = time.time()
    ctx = ray.train.get_context()
    worker = Worker(spec, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    cfg = spec.train
    start_step = worker.resume()
    progress = Progress(spec.stage, cfg.max_steps, start_step, spec.progress and worker.is_rank0)
    while worker.step < cfg.max_steps:
        _check_fault(spec, worker.rank, worker.step)
        metrics = worker.train_step()
        step = worker.step
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics.update(worker.evaluate())
        worker.tracker.log(metrics, step)
        worker.last_metrics.update(metrics)
        progress.update(metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            worker.save_checkpoint(metrics)
    progress.close()
    report = worker.export()
    frozen = all_reduce_sum(torch.tensor([0.0 if worker.teacher_is_frozen() else 1.0])).item() == 0
    if worker.is_rank0:
        summary = {"stage": spec.stage, "final_step": worker.step, "max_steps": cfg.max_steps,
                   "start_step": start_step, "world_size": worker.world, "global_batch_size": cfg.global_batch_size,
                   "zero_stage": cfg.zero_stage, "precision": cfg.precision, "model_dir": spec.model_dir,
                   "checkpoint": worker.last_checkpoint, "metrics": worker.last_metrics,
                   "teacher_frozen": frozen, "export_sparsity": report.get("global_sparsity"),
                   "attempt_elapsed_s": time.time() - started, "timings": worker.timings}
        tmp = spec.summary_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, spec.summary_path)
        worker.tracker.artifact(spec.summary_path)
        worker.tracker.flush()
