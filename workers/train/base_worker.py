"""What every training stage's Ray Train worker shares: the DeepSpeed engine, step-exact resume,
the optimizer step, checkpoints (one `Checkpointer` over named parts) and the rank-0 summary.
Subclasses say what a batch is, what the loss is, how to evaluate and how to export (pretraining in
`pretraining_worker.py`, fine-tuning in `workers/finetune/finetune_worker.py`).

Every rank runs the same sequence of collectives and calls `ray.train.report` at the same steps
(only at checkpoints), or Ray Train would hang. `step` counts completed optimizer updates: step `s`
reads the micro-batches at the data cursor, uses LR `lr_fn(s)`, and pruning hooks get `s`.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Optional

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint

from pipelines.sparsity.callback import PruningCallback
from workers import preemption
from workers.jsonl import read_jsonl
from workers.log_files import output_to, worker_log
from workers.run_records import AttemptRecord, TrainSummary, append_record, read_record_lines, write_record
from workers.stall_watchdog import StallWatchdog, stall_folder
from workers.train.checkpoint_parts import EnginePart, LRPosition, RNGState, ValuePart
from workers.train.checkpointer import Checkpointer
from workers.train.context import SafeTracker, all_reduce_sum, barrier, gather
from workers.train.data import DataCursor
from workers.train.engine import build_engine, set_learning_rate
from workers.train.progress import Progress

MASKED_FRACTION = "data/masked_fraction"


class BaseWorker:
    """State of one Ray Train worker for one attempt of a stage. Subclasses call `_setup` from
    their `__init__` with the model, then set `self.data` (a RankData)."""

    data: Any  # RankData (per-rank order) or StreamingBatches (global order)
    lr_fn: Callable[[int], float]
    cursor_is_global: bool = False  # True: the data cursor is the same on every rank (saved once)

    def __init__(self, spec: Any, rank: int, world_size: int, device: torch.device, in_ray: bool = True) -> None:
        self._started = time.perf_counter()
        self.spec, self.cfg = spec, spec.train
        self.layout, self.run = spec.layout, spec.run
        self.rank, self.world, self.device, self.in_ray = rank, world_size, device, in_ray
        if self.world != self.cfg.num_workers:
            raise RuntimeError(f"{self.world} workers started, the recipe says {self.cfg.num_workers}")
        self.is_rank0 = self.rank == 0
        self.seed = spec.seed_value
        self.timings: dict[str, Any] = {"checkpoint_save_s": []}
        os.makedirs(self.run.checkpoints, exist_ok=True)
        # ranks on one node share its copy of the run: the first brings the inputs, the others wait
        local_rank = ray.train.get_context().get_local_rank() if in_ray else rank
        if local_rank == 0:
            for path in spec.input_paths:
                self.layout.pull(path, prune=True)  # no stale shard of a redone stage is read here
        barrier()
        self.tracker = SafeTracker(spec.tracker, self.run.metrics, self.is_rank0)
        node = ray.get_runtime_context().get_node_id() if in_ray else None
        self.watch = preemption.Watch(self.layout.where, node)
        self.preempt_requested = False  # set by train_step when any rank got a preemption notice
        self.step, self.cursor = 0, DataCursor()
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: Optional[str] = None
        self.pruning: Optional[PruningCallback] = None

    def push_run_files(self) -> None:
        """Rank 0: the run folder's logs, summary and export to the store (checkpoints go their own way)."""
        if self.is_rank0:
            self.layout.push(self.run.root)

    def _setup(self, model: torch.nn.Module) -> None:
        """DeepSpeed engine (train mode), the pruning callback when the spec prunes or locks a
        pattern, and the checkpointer over the worker's stateful parts."""
        self.model_config = model.config
        self.engine = build_engine(model, self.cfg, universal=getattr(self.spec, "resume_universal", False))
        # from_pretrained returns a model in eval mode: without this, dropout would stay off until the
        # first evaluation switches it on, and a resumed run would differ from an uninterrupted one
        self.engine.train()
        if self.spec.pruning is not None:
            from workers.deepspeed_masks import DeepSpeedMaskEnforcer  # DeepSpeed-side mask enforcement

            keep = self.spec.pruning.pruned_weights == "keep"
            self.pruning = PruningCallback(self.engine.module, self.spec.pruning,
                                           enforcer=DeepSpeedMaskEnforcer(self.engine, keep=keep))
        torch.manual_seed(self.seed * 1000 + self.rank)  # dropout differs per rank; restored on resume
        cursor = ValuePart(lambda: self.cursor.to_dict(), self._load_cursor)
        shared = {"train_state": ValuePart(self._train_state, self._load_train_state),
                  "lr": LRPosition(lambda step: self.lr_fn(step), lambda: self.step),
                  "pruning": self.pruning}
        own: dict[str, Any] = {"rng": RNGState()}
        (shared if self.cursor_is_global else own)["data"] = cursor
        self.checkpointer = Checkpointer(
            self.layout, self.run, self.rank, self.world, self.cfg.keep_checkpoints,
            engine=EnginePart(self.engine, universal=getattr(self.spec, "resume_universal", False)),
            parts=shared, rank_parts=own,
            meta={"zero_stage": self.cfg.zero_stage, "precision": self.cfg.precision,
                  "global_batch_size": self.cfg.global_batch_size})

    def data_fingerprint(self) -> Optional[str]:
        """What the data cursor points into (the preprocess stage's fingerprint): a checkpoint of other
        data must not resume. None where there is nothing to check."""
        return None

    def _train_state(self) -> dict[str, Any]:
        return {"step": self.step, "stage": self.run.name, "world_size": self.world, "seed": self.seed,
                "global_batch_size": self.cfg.global_batch_size, "data": self.data_fingerprint(),
                "samples_seen": self.step * self.cfg.global_batch_size}

    def _load_train_state(self, state: Mapping[str, Any]) -> None:
        if int(state["global_batch_size"]) != self.cfg.global_batch_size:
            raise ValueError(f"the checkpoint was trained with global_batch_size={state['global_batch_size']}, "
                             f"the recipe says {self.cfg.global_batch_size}")
        if state.get("data") != self.data_fingerprint():
            raise ValueError(f"the checkpoint was trained on other data (preprocess fingerprint {state.get('data')}, "
                             f"this run's is {self.data_fingerprint()}): redo the {self.run.name} stage")
        self.step = int(state["step"])

    def _load_cursor(self, state: Mapping[str, Any]) -> None:
        self.cursor = type(self.cursor)(**state)

    def frozen_teacher(self, model: torch.nn.Module) -> torch.nn.Module:
        """Plain module, eval mode, no grads, no optimizer state, in the training precision."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.precision, torch.float32)
        model = model.to(device=self.device, dtype=dtype).eval()
        model.requires_grad_(False)
        return model

    # -- hooks ---------------------------------------------------------------------------------
    def step_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the step at the data cursor (default: rows made into batches)."""
        return [self.make_batch(rows, micro) for micro, rows in enumerate(self.data.step_batches(self.cursor))]

    def make_batch(self, rows: list[dict], micro: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_norm(self, batches: list[dict[str, torch.Tensor]]) -> Any:
        """What the loss of each micro-batch is normalised by (None: its own mean). May be collective."""
        return None

    def forward_loss(self, batch: dict[str, torch.Tensor], norm: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def mlm_counts(self, batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """(MLM targets, non-special tokens) of a batch: 0, 0 where there is no MLM."""
        return 0, 0

    def data_metrics(self) -> dict[str, float]:
        """What the step read, for the record (e.g. a digest of the global batch's samples)."""
        return {}

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def export(self) -> dict[str, Any]:
        raise NotImplementedError

    def summary_extra(self) -> dict[str, Any]:
        return {}

    # -- resume --------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load the newest usable checkpoint (rank 0 chooses, all load); returns the start step."""
        started = time.perf_counter()
        restored = self.checkpointer.restore()
        if restored is not None:
            self.last_checkpoint = restored[1]
            self.timings["checkpoint_load_s"] = time.perf_counter() - started
        nodes = gather(ray.get_runtime_context().get_node_id() if self.in_ray else "local")
        if self.is_rank0:
            self.layout.pull(self.run.attempts)  # the history of earlier attempts, maybe from another node
            self.layout.pull(self.run.metrics)
            read_jsonl(self.run.metrics)  # a torn last line (a kill mid-write, a full disk) is cut before appending
            earlier = read_record_lines(AttemptRecord, self.run.attempts, self.run.stage)
            # startup_s: worker start to resumed, the figure a rerun's stall_timeout_s is checked against
            append_record(AttemptRecord(start_step=self.step, checkpoint=self.last_checkpoint, time=time.time(),
                                        nodes=nodes, startup_s=round(time.perf_counter() - self._started, 1)),
                          self.run.attempts)
            attempts = len(earlier) + 1
            # the latest attempt's start; attempts > 1 means a restart (worker failure or rerun)
            self.tracker.tags({f"{self.run.name}.start_step": str(self.step),
                               f"{self.run.name}.attempts": str(attempts)})
        return self.step

    # -- training ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        masks_changed = self.pruning is not None and self.pruning.on_step_begin(self.step)
        lr = self.lr_fn(self.step)
        set_learning_rate(self.engine, lr)
        sums: Optional[torch.Tensor] = None
        names: list[str] = []
        targets = maskable = 0
        batches = [{k: v.to(self.device) for k, v in b.items()} for b in self.step_batches()]
        norm = self.step_norm(batches)
        for micro, batch in enumerate(batches):
            t, m = self.mlm_counts(batch)
            targets, maskable = targets + t, maskable + m
            loss, parts = self.forward_loss(batch, norm)
            self.engine.backward(loss)
            if self.pruning is not None and micro == len(batches) - 1:
                self.pruning.before_step()  # the optimizer update happens in this engine.step()
            self.engine.step()
            names = list(parts)
            values = torch.stack([p.detach().float().cpu() for p in parts.values()]).double()
            sums = values if sums is None else sums + values
        if self.pruning is not None:
            self.pruning.on_step_end(self.step)
        assert sums is not None
        notice = 1.0 if self.watch.requested() else 0.0  # in the same all-reduce: every rank stops at this step
        reduced = all_reduce_sum(torch.cat([sums, torch.tensor([targets, maskable, notice], dtype=torch.float64)]))
        self.preempt_requested = bool(reduced[-1] > 0)
        reduced = reduced[:-1]
        mean = reduced[:-2] / (self.world * self.cfg.grad_accum_steps)
        data_metrics = self.data_metrics()
        self.step += 1
        self.cursor = self.data.advance(self.cursor)
        elapsed = time.perf_counter() - started
        metrics = {n: float(v) for n, v in zip(names, mean.tolist())}
        total_targets, total_maskable = reduced[-2:].tolist()
        metrics.update({"lr": lr, "throughput/samples_per_s": self.cfg.global_batch_size / max(elapsed, 1e-9),
                        "epoch": float(self.cursor.epoch), **data_metrics})
        if total_maskable:  # no MLM (fine-tuning): a fraction that does not apply is not logged
            metrics[MASKED_FRACTION] = total_targets / total_maskable
        if masks_changed:  # logged at the step whose forward first used the new masks
            metrics.update(self.pruning.update_metrics())
        return metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank writes its parts, rank 0 commits; then the run's logs go with it to the store."""
        started = time.perf_counter()
        if self.pruning is not None:
            self.pruning.apply()  # checkpoints written before re-masking would not be sparse
        self.last_checkpoint = self.checkpointer.save(self.step)
        self.tracker.flush()
        self.push_run_files()  # the metrics so far go with the checkpoint
        self.timings["checkpoint_save_s"].append(time.perf_counter() - started)
        if self.in_ray:
            self._report(metrics, self.last_checkpoint)

    def _report(self, metrics: dict[str, float], final: str) -> None:
        """Same number of calls on every rank; only rank 0 attaches the (pointer) checkpoint."""
        payload = {k: v for k, v in metrics.items() if not k.startswith("sparsity/layer/")}
        payload["step"] = self.step
        if not self.is_rank0:
            ray.train.report(payload)
            return
        with tempfile.TemporaryDirectory() as pointer:
            with open(os.path.join(pointer, "pofa_checkpoint.json"), "w") as f:
                json.dump({"step": self.step, "path": final}, f)
            ray.train.report(payload, checkpoint=Checkpoint.from_directory(pointer),
                             checkpoint_dir_name=f"step-{self.step:08d}")


def _check_fault(spec: Any, rank: int, step: int) -> None:
    fault = spec.fault
    if fault is not None and fault.rank == rank and fault.step == step and not os.path.exists(fault.marker):
        if fault.once:
            with open(fault.marker, "w") as f:
                f.write(str(step))
        if fault.kind == "stall":
            import threading

            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # nobody releases it: a real hang, as a stale lock or a lost peer would be
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")


def run_worker(make_worker: Callable[[int, int, torch.device], BaseWorker], spec: Any) -> None:
    """The loop every training stage runs on each Ray Train worker: resume, train with periodic
    evaluation and checkpoints, export, and (rank 0) write the attempt's summary."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # everything this worker prints (Ray Train, DeepSpeed, transformers, warnings) goes to its log file;
    # a worker without progress for stall_timeout_s leaves its stacks beside it and is stopped
    with output_to(worker_log(getattr(spec, "log_dir", None), f"worker-{rank}")) as log, \
            StallWatchdog(f"{spec.run.name} worker-{rank}", spec.stall_timeout_s, stall_folder(spec),
                          log_path=log) as watchdog:
        _run_worker(make_worker, spec, ctx, watchdog)


def _run_worker(make_worker: Callable[[int, int, torch.device], BaseWorker], spec: Any, ctx: Any,
                watchdog: StallWatchdog) -> None:
    started = time.time()
    watchdog.beat("starting: building the model and the DeepSpeed engine")
    worker = make_worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    worker.timings["worker_init_s"] = time.perf_counter() - worker._started
    # wall-clock marks of the start-up, for `make bench-train`'s breakdown of where it goes
    worker.timings.update(entered_at=started, built_at=time.time())
    cfg = spec.train
    watchdog.beat("starting: loading the newest checkpoint")
    start_step = worker.resume()
    worker.timings["resumed_at"] = time.time()
    if start_step >= cfg.max_steps and worker.is_rank0:
        # resumed at its last step (stopped between the final checkpoint and the stage's end): the
        # summary's metrics are the ones that step logged, not an empty record
        for record in read_jsonl(worker.run.metrics):
            if record.get("step", 0) <= start_step:
                worker.last_metrics.update({k: v for k, v in record.items() if k not in ("step", "time")})
    progress = Progress(worker.run.name, cfg.max_steps, start_step, spec.progress and worker.is_rank0)
    preempted = False
    while worker.step < cfg.max_steps:
        watchdog.beat(f"step {worker.step + 1}")
        _check_fault(spec, worker.rank, worker.step)
        metrics = worker.train_step()
        step = worker.step
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            watchdog.beat(f"evaluating after step {step}")
            metrics.update(worker.evaluate())
        worker.tracker.log(metrics, step)
        worker.last_metrics.update(metrics)
        progress.update(metrics)
        preempted = worker.preempt_requested
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or preempted:
            watchdog.beat(f"checkpointing step {step}")
            worker.save_checkpoint(metrics)
        if preempted:  # the step is committed: end this attempt; a rerun resumes from it
            break
    progress.close()
    watchdog.beat("exporting the model")
    report = {} if preempted else worker.export()
    extra = {} if preempted else worker.summary_extra()  # may be collective
    watchdog.beat("writing the summary")
    if worker.is_rank0:
        summary = TrainSummary(stage=worker.run.name, final_step=worker.step, max_steps=cfg.max_steps,
                               preempted=preempted, start_step=start_step, world_size=worker.world,
                               global_batch_size=cfg.global_batch_size, zero_stage=cfg.zero_stage,
                               precision=cfg.precision, model_dir=worker.run.model,
                               checkpoint=worker.last_checkpoint, metrics=worker.last_metrics,
                               export_sparsity=report.get("global_sparsity"), quantization=report.get("qat"),
                               attempt_elapsed_s=time.time() - started, timings=worker.timings, **extra)
        write_record(summary, worker.run.summary)
        worker.tracker.artifact(worker.run.summary)
        worker.tracker.flush()
    worker.push_run_files()  # rank 0: export and summary to the store, for the driver on any node
