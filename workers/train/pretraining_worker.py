"""The pretraining worker (teacher preparation and student pruning): the preprocess stage's shards,
MLM + NSP (plus distillation from the frozen teacher for the student), validation on the
held-out 5%, and a Hugging Face pretraining-model export. The shared machinery (engine, resume,
steps, checkpoints) is `base_worker.py`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from pipelines.data.collator import mlm_counts
from pipelines.distillation import distillation_loss, teacher_logits
from pipelines.models.build import build_pretraining_model, load_pretraining_model
from pipelines.models.heads import accepted_inputs
from pipelines.training.losses import GlobalNorm, metrics_from_counts, pretraining_counts, pretraining_loss
from pipelines.training.schedule import make_lr_fn
from workers.stage_outputs import load_manifest
from workers.train.base_worker import BaseWorker, run_worker
from workers.train.context import all_reduce_sum, barrier
from workers.train.export import export_model, gather_full_state
from workers.train.inputs import PretrainingInputs
from workers.train.streaming import GlobalCursor, batch_digest, counts_of
from workers.train.spec import TrainSpec

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class PretrainingWorker(BaseWorker):
    """One Ray Train worker of the teacher or student stage. Its data cursor is global (the same on
    every rank), so the stage resumes on any number of workers."""

    cursor_is_global = True

    def __init__(self, spec: TrainSpec, rank: int, world_size: int, device: torch.device,
                 in_ray: bool = True) -> None:
        super().__init__(spec, rank, world_size, device, in_ray)
        self.inputs = PretrainingInputs(spec.layout, self.seed, rank, world_size, self.cfg.global_batch_size,
                                        self.cfg.micro_batch_size, self.cfg.eval_batches * self.cfg.global_batch_size)
        self.tokenizer = self.inputs.tokenizer
        self.cursor = GlobalCursor()
        preprocess = load_manifest(spec.layout, "preprocess")
        self._data_fingerprint = preprocess.fingerprint if preprocess is not None else None
        model = self._build_model()
        self.teacher = self._build_teacher()
        self.lr_fn = make_lr_fn(self.cfg, spec.pruning)
        self._setup(model)
        self.data = self.inputs.train

    def _build_model(self) -> torch.nn.Module:
        if self.spec.init_dir is not None:
            return load_pretraining_model(self.spec.init_dir)
        assert self.spec.model is not None
        return build_pretraining_model(self.spec.model, vocab_size=len(self.tokenizer),
                                       pad_token_id=self.tokenizer.pad_token_id, seed=self.seed)

    def _build_teacher(self) -> Optional[torch.nn.Module]:
        if self.spec.stage != "student":
            return None
        return self.frozen_teacher(load_pretraining_model(self.spec.init_dir))

    # -- hooks ---------------------------------------------------------------------------------
    def step_batches(self) -> list[dict[str, torch.Tensor]]:
        return self.inputs.train.step_batches(self.cursor)

    def data_fingerprint(self) -> Optional[str]:
        return self._data_fingerprint

    def step_norm(self, batches: list[dict[str, torch.Tensor]]) -> GlobalNorm:
        """The global batch's counts (all ranks): every micro-batch's loss is its share of the global
        batch's means, so the gradient is the same however the batch is split over workers."""
        targets, tokens, sequences = all_reduce_sum(counts_of(batches)).tolist()
        return GlobalNorm(targets, tokens, sequences, scale=float(self.world * self.cfg.grad_accum_steps))

    def mlm_counts(self, batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        return mlm_counts(batch)

    def data_metrics(self) -> dict[str, float]:
        """`data/batch`: a digest of the global batch's samples, the same on any number of workers."""
        return {"data/batch": float(batch_digest(self.inputs.train.global_rows(self.cursor)))}

    def forward_loss(self, batch: dict[str, torch.Tensor],
                     norm: Optional[GlobalNorm] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = accepted_inputs(self.engine, batch, MODEL_INPUTS)
        out = self.engine(**inputs)
        if self.teacher is None:
            total, mlm, nsp = pretraining_loss(out, batch, norm)
            return total, {"loss": total, "loss/ce_mlm": mlm, "loss/ce_nsp": nsp}
        t_out = teacher_logits(self.teacher, inputs)
        dl = distillation_loss("pretraining", out, t_out, batch, self.spec.distillation, norm)
        # each head's term, so a user can recombine `loss` from them (0.5 * (ce_mlm + ce_nsp) + 0.5 * (kd_mlm + kd_nsp))
        return dl.total, {"loss": dl.total, "loss/hard": dl.hard, "loss/kd": dl.kd,
                          **{f"loss/{k}": v for k, v in dl.terms.items()}}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """val/* on the same validation samples every time, whatever the worker count: counts summed
        over ranks (a rank short of samples runs the same passes and discards them)."""
        self.engine.eval()
        counts = torch.zeros(6, dtype=torch.float64)
        for batch, real in self.inputs.validation.batches():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.engine(**accepted_inputs(self.engine, batch, MODEL_INPUTS))
            if real:
                counts += pretraining_counts(out, batch).cpu()
        self.engine.train()
        metrics = metrics_from_counts(all_reduce_sum(counts))
        if self.pruning is not None:
            metrics.update(self.pruning.metrics())
        return metrics

    def export(self) -> dict[str, Any]:
        if self.pruning is not None:
            self.pruning.apply()  # training may end between mask updates
        full = gather_full_state(self.engine)
        if self.pruning is not None:
            full = self.pruning.masked(full)  # under keep the fp32 values are the stored ones: exact zeros out
        report: dict[str, Any] = {}
        if self.is_rank0:
            report = export_model(full, self.model_config, self.layout.path(self.inputs.record.tokenizer),
                                  self.run.model, self.spec.pruning)
            self.tracker.artifact(self.run.model, "model")
        barrier()
        return report

    def summary_extra(self) -> dict[str, Any]:
        frozen = self.teacher is None or all(not p.requires_grad and p.grad is None for p in self.teacher.parameters())
        frozen_all = all_reduce_sum(torch.tensor([0.0 if frozen else 1.0])).item() == 0
        return {"teacher_frozen": frozen_all}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (one call per worker and attempt)."""
    spec: TrainSpec = config["spec"]
    run_worker(lambda rank, world, device: PretrainingWorker(spec, rank, world, device), spec)
