"""The fine-tuning worker: task features, a classification or QA head on the (sparse) encoder,
the zero pattern locked by the sparsity core's constant schedule, optional distillation from the
task's fine-tuned dense teacher, and task metrics on the evaluation splits.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

from pipelines.distillation import distillation_loss, teacher_logits
from pipelines.finetune.collate import collate_features
from pipelines.finetune.metrics import classification_metrics, squad_metrics
from pipelines.finetune.qa import postprocess_qa
from pipelines.finetune.qat import enable_qat, export_int8
from pipelines.finetune.tasks import TaskSpec, get_task
from pipelines.models.heads import accepted_inputs
from pipelines.sparsity.report import prunable_weights
from pipelines.training.schedule import linear_lr
from workers.finetune.spec import FinetuneSpec, lock_config
from workers.train.context import barrier, broadcast_from_rank0, gather
from workers.train.data import RankData, plan_shard, read_rows
from workers.train.export import export_model, gather_full_state
from workers.train.base_worker import BaseWorker, run_worker

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
LABELS = ("labels", "start_positions", "end_positions")


def auto_class(task: TaskSpec) -> Any:
    return AutoModelForQuestionAnswering if task.kind == "qa" else AutoModelForSequenceClassification


def load_task_model(name_or_path: str, task: TaskSpec, seed: int) -> torch.nn.Module:
    """The encoder with a fresh task head; the head's init is seeded so every rank builds the same one."""
    kwargs: dict[str, Any] = {}
    if task.kind != "qa":
        names = task.label_names or tuple(str(i) for i in range(task.num_labels))
        kwargs = {"num_labels": task.num_labels, "id2label": dict(enumerate(names)),
                  "label2id": {n: i for i, n in enumerate(names)}}
    loader = logging.getLogger("transformers.modeling_utils")
    loader.addFilter(_drop_load_report)  # it warns about the head swap, which is the point here
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = auto_class(task).from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        loader.removeFilter(_drop_load_report)
    _check_head_swap(model, name_or_path, info)
    return model


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _check_head_swap(model: torch.nn.Module, source: str, info: dict[str, Any]) -> None:
    """A pretraining export becoming a task model drops its pretraining heads and starts a fresh task
    head: expected, one line in the worker's log. Anything else missing from the checkpoint (encoder
    weights) is a real problem and is said as a warning."""
    head = tuple(n for n, m in model.named_children()
                 if n != model.base_model_prefix and any(True for _ in m.parameters()))
    missing = list(info.get("missing_keys") or [])
    unexpected = list(info.get("unexpected_keys") or [])
    surprising = [k for k in missing if not k.startswith(head)]
    print(f"pofa: {source}: task head {', '.join(head) or '-'} starts fresh; {len(unexpected)} pretraining-head "
          "tensor(s) dropped (expected for a pretraining export)", flush=True)
    if surprising:
        warnings.warn(f"{source}: {len(surprising)} encoder tensor(s) missing from the checkpoint and initialised "
                      f"at random, e.g. {surprising[:3]}")


def rank_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    pieces = plan_shard([n], rank, world)
    return (pieces[0][1], pieces[0][2]) if pieces else (0, 0)


class FinetuneWorker(BaseWorker):
    def __init__(self, spec: FinetuneSpec, rank: int, world_size: int, device: torch.device,
                 in_ray: bool = True) -> None:
        super().__init__(spec, rank, world_size, device, in_ray)
        self.task = get_task(spec.task.name)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.data.tokenizer)
        model = load_task_model(spec.init_model, self.task, self.seed)
        self.teacher: Optional[torch.nn.Module] = None
        if spec.teacher_dir is not None:
            self.teacher = self.frozen_teacher(auto_class(self.task).from_pretrained(spec.teacher_dir))
        self.qat_names: list[str] = []
        if spec.qat and spec.role == "student":
            self.qat_names = enable_qat(model, prunable_weights(model, spec.pruning or lock_config()))
        cfg = self.cfg
        self.lr_fn = lambda step: linear_lr(step, base_lr=cfg.learning_rate, total_steps=cfg.max_steps,
                                            warmup_ratio=cfg.warmup_ratio)
        self._setup(model)
        train_path = spec.data.features(self.task.train_split)
        # equal contiguous shares (unequal ones skew the gradient mean), read from this rank's row groups only
        lo, hi = rank_rows(pq.ParquetFile(train_path).metadata.num_rows, rank, world_size)
        self.data = RankData(read_rows(train_path, lo, hi, columns=None), cfg.samples_per_rank_per_step,
                             cfg.micro_batch_size, self.seed, rank)
        self.eval_tables = {split: pq.read_table(spec.data.features(split))
                            for split in self.task.eval_splits.values()}

    # -- hooks ---------------------------------------------------------------------------------
    def make_batch(self, rows: list[dict], micro: int) -> dict[str, torch.Tensor]:
        return collate_features(rows, self.tokenizer.pad_token_id)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return accepted_inputs(self.engine, batch, MODEL_INPUTS)

    def forward_loss(self, batch: dict[str, torch.Tensor], norm: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.teacher is None:  # the model's own loss: CE on the labels (mean of start/end CE for QA)
            out = self.engine(**self._inputs(batch), **{k: batch[k] for k in LABELS if k in batch})
            return out.loss, {"loss": out.loss}
        out = self.engine(**self._inputs(batch))
        t_out = teacher_logits(self.teacher, self._inputs(batch))
        dl = distillation_loss("qa" if self.task.kind == "qa" else "classification", out, t_out, batch,
                               self.spec.distillation)
        return dl.total, {"loss": dl.total, "loss/hard": dl.hard, "loss/kd": dl.kd}

    @torch.no_grad()
    def _logits(self, table: pa.Table) -> list[np.ndarray]:
        """This rank's contiguous share of `table`; every rank runs the same number of forward passes
        (ZeRO-3 gathers parameters collectively), padding with repeats of its first row."""
        n, m = len(table), self.cfg.micro_batch_size
        per_rank = math.ceil(n / self.world)
        lo, hi = min(n, self.rank * per_rank), min(n, (self.rank + 1) * per_rank)
        out: list[np.ndarray] = []
        for start in range(0, per_rank, m):
            idx = [i for i in range(lo + start, lo + min(start + m, per_rank)) if i < hi]
            real = len(idx)
            idx = idx + [0] * (min(m, per_rank - start) - real)
            batch = collate_features(table.take(pa.array(idx, pa.int64())).to_pylist(), self.tokenizer.pad_token_id)
            result = self.engine(**self._inputs({k: v.to(self.device) for k, v in batch.items()}))
            if self.task.kind == "qa":
                both = torch.stack([result.start_logits, result.end_logits], dim=1).float().cpu().numpy()
                out.extend(both[:real])
            else:
                out.extend(result.logits.float().cpu().numpy()[:real])
        return out

    def _qa_metrics(self, split: str, rows: list[np.ndarray]) -> dict[str, float]:
        """Start/end logits of every feature (each [2, its length]) -> answer spans -> EM/F1."""
        width = max(r.shape[-1] for r in rows)
        padded = np.full((len(rows), 2, width), -1e9, dtype=np.float32)
        for i, r in enumerate(rows):
            padded[i, :, :r.shape[-1]] = r
        with open(self.spec.data.examples(split)) as f:
            examples = [json.loads(line) for line in f]
        answers = postprocess_qa(examples, self.eval_tables[split], padded[:, 0], padded[:, 1],
                                 self.spec.task.n_best_size, self.spec.task.max_answer_length)
        return squad_metrics(answers, examples)

    def _classification_metrics(self, logits: dict[str, list[np.ndarray]]) -> dict[str, float]:
        """Predictions and labels per evaluation split, keyed by the task's metric prefix."""
        prefix_of = {split: prefix for prefix, split in self.task.eval_splits.items()}
        preds = {prefix_of[s]: np.argmax(np.stack(rows), axis=-1) for s, rows in logits.items()}
        labels = {prefix_of[s]: np.asarray(self.eval_tables[s].column("label").to_pylist()) for s in logits}
        return classification_metrics(self.task, preds, labels)

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        shares = {split: gather(self._logits(table)) for split, table in self.eval_tables.items()}
        self.engine.train()
        metrics: Optional[dict[str, float]] = None
        if self.is_rank0:
            logits = {split: [r for share in parts for r in share] for split, parts in shares.items()}
            if self.task.kind == "qa":
                found = {k: v for split, rows in logits.items() for k, v in self._qa_metrics(split, rows).items()}
            else:
                found = self._classification_metrics(logits)
            metrics = {f"eval/{k}": round(float(v), 4) for k, v in found.items()}
        metrics = broadcast_from_rank0(metrics)
        assert metrics is not None
        if self.pruning is not None:
            metrics.update(self.pruning.metrics())
        return metrics

    def export(self) -> dict[str, Any]:
        if self.pruning is not None:
            self.pruning.apply()
        full = gather_full_state(self.engine)
        if self.pruning is not None:
            full = self.pruning.masked(full)  # the locked pattern, exactly zero in the export
        report: dict[str, Any] = {}
        if self.is_rank0:
            report = export_model(full, self.model_config, self.spec.data.tokenizer, self.run.model,
                                  self.spec.pruning, auto_class=auto_class(self.task))
            if self.qat_names:
                report["qat"] = export_int8(self.run.model, self.qat_names)
            self.tracker.artifact(self.run.model, "model")
        barrier()
        return report


def finetune_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker and attempt)."""
    spec: FinetuneSpec = config["spec"]
    run_worker(lambda rank, world, device: FinetuneWorker(spec, rank, world, device), spec)
