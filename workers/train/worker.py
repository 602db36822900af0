"""What every training stage's Ray Train worker shares: the DeepSpeed engine, step-exact resume,
the optimizer step, verified checkpoints and the rank-0 summary. Subclasses say what a batch is,
what the loss is, how to evaluate and how to export (pretraining in `loop.py`, fine-tuning in
`workers/finetune/loop.py`).

Every rank runs the same sequence of collectives and calls `ray.train.report` at the same steps
(only at checkpoints), or Ray Train would hang. `step` counts completed optimizer updates: step `s`
reads the micro-batches at the data cursor, uses LR `lr_fn(s)`, and pruning hooks get `s`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from pipelines.sparsity.callback import PruningCallback
from workers.storage import RunStore, except_checkpoints
from workers.train import checkpoint as ckpt
from workers.train import state as st
from workers.train import stored_checkpoint as stored
from workers.train.context import SafeTracker, all_reduce_sum, barrier, broadcast_from_rank0, gather, logger
from workers.train.data import DataCursor, RankData
from workers.train.engine import build_engine, set_learning_rate
from workers.train.progress import Progress


def batch_seed(seed: int, rank: int, step: int, micro: int, purpose: int = 0) -> int:
    """Seed of one micro-batch's randomness: a pure function, so a resumed step redraws the same."""
    entropy = [seed, rank, step, micro, purpose]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class BaseWorker:
    """State of one Ray Train worker for one attempt of a stage. Subclasses call `_setup` from
    their `__init__` with the model, then set `self.data` (a RankData)."""

    data: RankData
    lr_fn: Callable[[int], float]

    def __init__(self, spec: Any, rank: int, world_size: int, device: torch.device, in_ray: bool = True) -> None:
        self._started = time.perf_counter()
        self.spec, self.cfg = spec, spec.train
        self.rank, self.world, self.device, self.in_ray = rank, world_size, device, in_ray
        if self.world != self.cfg.num_workers:
            raise RuntimeError(f"{self.world} workers started, the recipe says {self.cfg.num_workers}")
        self.is_rank0 = self.rank == 0
        self.seed = spec.seed_value
        self.timings: dict[str, Any] = {"checkpoint_save_s": []}
        if self.is_rank0:
            os.makedirs(spec.checkpoint_dir, exist_ok=True)
        self.store: Optional[RunStore] = spec.store if getattr(spec, "store", None) and spec.store.remote else None
        if self.store is not None:
            # ranks on one node share its mirror: the first downloads, the others wait for it
            local_rank = ray.train.get_context().get_local_rank() if in_ray else rank
            if local_rank == 0:
                self._pull_inputs()
            barrier()
        self.tracker = SafeTracker(spec.tracker, spec.metrics_path, self.is_rank0)
        self.step, self.cursor = 0, DataCursor()
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: Optional[str] = None
        self.pruning: Optional[PruningCallback] = None

    # -- run directory on an object store -------------------------------------------------------
    def _pull_inputs(self) -> None:
        """This node's mirror gets what the run reads (data, tokenizer, models) from the store; files
        it already holds unchanged are not downloaded again."""
        assert self.store is not None
        os.makedirs(self.spec.checkpoint_dir, exist_ok=True)
        for path in self.spec.input_paths:
            rel = self.store.rel(path) if path else None
            if rel is not None:
                self.store.pull(rel, prune=True)  # no stale shard of a redone stage is read here

    def _stage_rel(self) -> str:
        assert self.store is not None
        rel = self.store.rel(self.spec.stage_dir)
        if rel is None:
            raise ValueError(f"{self.spec.stage_dir} is outside the run directory mirror {self.store.local}")
        return rel

    def push_stage_files(self) -> None:
        """Rank 0: the stage folder's logs, summary and export to the store (checkpoints go their own way)."""
        if self.store is not None and self.is_rank0:
            self.store.push(self._stage_rel(), exclude=except_checkpoints)

    def _setup(self, model: torch.nn.Module) -> None:
        """DeepSpeed engine (train mode) and, when the spec prunes or locks a pattern, the pruning callback."""
        self.model_config = model.config
        self.engine = build_engine(model, self.cfg)
        # from_pretrained returns a model in eval mode: without this, dropout would stay off until the
        # first evaluation switches it on, and a resumed run would differ from an uninterrupted one
        self.engine.train()
        if self.spec.pruning is not None:
            from workers.deepspeed_masks import DeepSpeedMaskEnforcer  # DeepSpeed-side mask enforcement

            self.pruning = PruningCallback(self.engine.module, self.spec.pruning,
                                           enforcer=DeepSpeedMaskEnforcer(self.engine))
        torch.manual_seed(self.seed * 1000 + self.rank)  # dropout differs per rank; restored on resume

    def frozen_teacher(self, model: torch.nn.Module) -> torch.nn.Module:
        """Plain module, eval mode, no grads, no optimizer state, in the training precision."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision, torch.float32)
        model = model.to(device=self.device, dtype=dtype).eval()
        model.requires_grad_(False)
        return model

    # -- hooks ---------------------------------------------------------------------------------
    def make_batch(self, rows: list[dict], micro: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def export(self) -> dict[str, Any]:
        raise NotImplementedError

    def summary_extra(self) -> dict[str, Any]:
        return {}

    # -- resume --------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest verified checkpoint (rank 0 chooses, all load); returns the start step."""
        started = time.perf_counter()
        if self.store is not None:
            choice = self._resume_stored()
        else:
            choice = None
            if self.is_rank0:
                found = ckpt.latest_valid_checkpoint(self.spec.checkpoint_dir, warn=logger.warning)
                choice = found[1] if found else None
            choice = broadcast_from_rank0(choice)
            if choice is not None:
                self._load(choice)
        if choice is not None:
            self.timings["checkpoint_load_s"] = time.perf_counter() - started
        nodes = gather(ray.get_runtime_context().get_node_id() if self.in_ray else "local")
        if self.is_rank0:
            if self.store is not None:  # the history of earlier attempts, maybe from another node
                rel = self._stage_rel()
                self.store.pull(rel, only=lambda r: r in (f"{rel}/attempts.jsonl", f"{rel}/metrics.jsonl"))
            with open(os.path.join(self.spec.stage_dir, "attempts.jsonl"), "a") as f:
                f.write(json.dumps({"start_step": self.step, "checkpoint": choice, "time": time.time(),
                                    "nodes": nodes}) + "\n")
            attempts = len(_read_attempts(self.spec.stage_dir))
            # the latest attempt's start; attempts > 1 means a restart (worker failure or rerun)
            self.tracker.tags({f"{self.spec.stage}.start_step": str(self.step),
                               f"{self.spec.stage}.attempts": str(attempts)})
        return self.step

    def _resume_stored(self) -> Optional[str]:
        """The newest committed stored checkpoint that every rank can download and read: rank 0 picks,
        all fetch their share, and one that fails anywhere is un-committed and the previous one tried."""
        assert self.store is not None
        root = self.store.rel(self.spec.checkpoint_dir)
        assert root is not None
        while True:
            choice = None
            if self.is_rank0:
                for _, rel in stored.committed(self.store, root):
                    problem = stored.verify_stored(self.store, rel)
                    if problem is None:
                        choice = rel
                        break
                    stored.set_aside(self.store, rel, problem, logger.warning)
            choice = broadcast_from_rank0(choice)
            if choice is None:
                return None
            local = os.path.join(self.spec.checkpoint_dir, f".tmp-restore-{os.path.basename(choice)}.rank-{self.rank}")
            problems = [p for p in gather(stored.fetch(self.store, choice, self.rank, local)) if p]
            if not problems:
                try:
                    self._load(local)
                finally:
                    shutil.rmtree(local, ignore_errors=True)  # DeepSpeed holds it in memory now
                self.last_checkpoint = self.store.where(choice)
                return self.last_checkpoint
            shutil.rmtree(local, ignore_errors=True)
            if self.is_rank0:
                stored.set_aside(self.store, choice, "; ".join(problems), logger.warning)

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
    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        if self.pruning is not None:
            self.pruning.on_step_begin(self.step)
        lr = self.lr_fn(self.step)
        set_learning_rate(self.engine, lr)
        sums: Optional[torch.Tensor] = None
        names: list[str] = []
        for micro, rows in enumerate(self.data.step_batches(self.cursor)):
            batch = {k: v.to(self.device) for k, v in self.make_batch(rows, micro).items()}
            loss, parts = self.forward_loss(batch)
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

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Temp folder -> every rank writes -> rank 0 verifies, renames, prunes -> report to Ray Train."""
        started = time.perf_counter()
        if self.pruning is not None:
            self.pruning.apply()  # checkpoints written before re-masking would not be sparse
        if self.store is not None:
            final = self._save_stored()
        else:
            final = self._save_local()
        self.last_checkpoint = final
        self.tracker.flush()
        self.push_stage_files()  # the metrics so far go with the checkpoint
        self.timings["checkpoint_save_s"].append(time.perf_counter() - started)
        if self.in_ray:
            self._report(metrics, final)

    def _write_state(self, folder: str) -> None:
        """Every rank's part of a checkpoint into `folder` (collective: DeepSpeed saves on all ranks)."""
        self.engine.save_checkpoint(folder, tag=ckpt.DS_TAG, client_state={"pofa_step": self.step})
        st.save_rank_state(folder, self.rank, self.world, self.step, self.cursor)
        if self.is_rank0:
            st.save_trainer_state(folder, {"step": self.step, "stage": self.spec.stage, "world_size": self.world,
                                           "global_batch_size": self.cfg.global_batch_size, "seed": self.seed,
                                           "samples_seen": self.step * self.cfg.global_batch_size})
            if self.pruning is not None:
                st.save_pruning_state(folder, self.pruning.state_dict())

    def _save_stored(self) -> str:
        """Each rank stages and uploads its own files; rank 0 commits (MANIFEST.json last) and prunes."""
        assert self.store is not None
        root = self.store.rel(self.spec.checkpoint_dir)
        assert root is not None
        rel_step = f"{root}/{ckpt.step_dir_name(self.step)}"
        staging = os.path.join(self.spec.checkpoint_dir, f"{ckpt.tmp_dir_name(self.step)}.rank-{self.rank}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        if self.is_rank0:
            self.store.delete(rel_step)  # the same step written again after a restart: no stale files
        barrier()
        problem: Optional[str] = None
        try:
            self._write_state(staging)
            files = stored.staged_files(staging)
            stored.upload(self.store, staging, rel_step, files)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            problem, files = f"rank {self.rank}: {exc}", {}
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        reported = gather({"problem": problem, "files": files})
        if self.is_rank0:
            problem = next((r["problem"] for r in reported if r["problem"]), None)
            if problem is None:
                problem = stored.commit(self.store, rel_step, self.step, self.world, [r["files"] for r in reported])
            if problem is None:
                stored.prune(self.store, root, self.cfg.keep_checkpoints)
        problem = broadcast_from_rank0(problem)
        if problem is not None:
            raise RuntimeError(f"checkpoint at step {self.step} was not stored: {problem}")
        return self.store.where(rel_step)

    def _save_local(self) -> str:
        root = self.spec.checkpoint_dir
        tmp = os.path.join(root, ckpt.tmp_dir_name(self.step))
        final = os.path.join(root, ckpt.step_dir_name(self.step))
        if self.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier()
        self._write_state(tmp)
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
        return final

    def _report(self, metrics: dict[str, float], final: str) -> None:
        """Same number of calls on every rank; only rank 0 attaches the (pointer) checkpoint."""
        payload = {k: v for k, v in metrics.items() if not k.startswith("sparsity/layer/")}
        payload["step"] = self.step
        if not self.is_rank0:
            ray.train.report(payload)
            return
        with tempfile.TemporaryDirectory() as pointer:
            with open(os.path.join(pointer, "pofa_checkpoint.json"), "w") as f:
                json.dump({"step": self.step, "path": final if "://" in final else os.path.abspath(final)}, f)
            ray.train.report(payload, checkpoint=Checkpoint.from_directory(pointer),
                             checkpoint_dir_name=ckpt.step_dir_name(self.step))


def _read_attempts(stage_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(stage_dir, "attempts.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_fault(spec: Any, rank: int, step: int) -> None:
    fault = spec.fault
    if fault is not None and fault.rank == rank and fault.step == step and not os.path.exists(fault.marker):
        with open(fault.marker, "w") as f:
            f.write(str(step))
        if fault.kind == "stall":
            time.sleep(3600)
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def run_worker(make_worker: Callable[[int, int, torch.device], BaseWorker], spec: Any) -> None:
    """The loop every training stage runs on each Ray Train worker: resume, train with periodic
    evaluation and checkpoints, export, and (rank 0) write the attempt's summary."""
    started = time.time()
    ctx = ray.train.get_context()
    worker = make_worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    worker.timings["worker_init_s"] = time.perf_counter() - worker._started
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
    extra = worker.summary_extra()  # may be collective
    if worker.is_rank0:
        summary = {"stage": spec.stage, "final_step": worker.step, "max_steps": cfg.max_steps,
                   "start_step": start_step, "world_size": worker.world, "global_batch_size": cfg.global_batch_size,
                   "zero_stage": cfg.zero_stage, "precision": cfg.precision, "model_dir": spec.model_dir,
                   "checkpoint": worker.last_checkpoint, "metrics": worker.last_metrics,
                   "export_sparsity": report.get("global_sparsity"), "quantization": report.get("qat"),
                   "attempt_elapsed_s": time.time() - started, "timings": worker.timings, **extra}
        tmp = spec.summary_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, spec.summary_path)
        worker.tracker.artifact(spec.summary_path)
        worker.tracker.flush()
    worker.push_stage_files()  # rank 0: export and summary to the store, for the driver on any node
