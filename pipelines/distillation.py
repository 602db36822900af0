"""Knowledge-distillation losses for the student (MLM+NSP), QA (start/end) and sequence
classification.

    total = hard_weight * hard + kd_weight * kd
    kd    = KL(softmax(teacher / T) || softmax(student / T)) * T**2   (mean over examples/tokens)

Defaults follow Prune OFA: 0.5 / 0.5, T = 2.0. Pretraining follows the reference's
`examples/transformers/language-modeling/run_mlm.py` (logit weights [1, 1] for prediction_logits and
seq_relationship_logits, combined in `model_compression_research/api_utils.py: HFTeacherWrapper`):
hard = CE_mlm + CE_nsp and kd = KL_mlm + KL_nsp (`mlm_nsp_kd: sum`; `mean` halves kd, pofa before
0.2). QA (start and end) takes the mean over its heads on both sides, as the reference's QA script.
The teacher runs in eval mode without gradients (`teacher_logits`). Every loss returns its parts so
the loop can log them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.data.collator import IGNORE_INDEX
from pipelines.distillation_config import DistillationConfig
from pipelines.kd_kernel import fused_kd_kl
from pipelines.models.heads import mlm_logits, nsp_logits
from pipelines.training.losses import GlobalNorm


@dataclass
class DistillationLoss:
    total: Tensor
    hard: Tensor
    kd: Tensor
    # each head's term before weighting (pretraining: ce_mlm, ce_nsp, kd_mlm, kd_nsp)
    terms: dict[str, Tensor] = field(default_factory=dict)

    def as_metrics(self, prefix: str = "loss") -> dict[str, float]:
        out = {prefix: float(self.total.detach()), f"{prefix}/hard": float(self.hard.detach()),
               f"{prefix}/kd": float(self.kd.detach())}
        out.update({f"{prefix}/{k}": float(v.detach()) for k, v in self.terms.items()})
        return out


def _wide(x: Tensor) -> Tensor:
    """Upcast half precision for the softmax; leave fp32/fp64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
          valid: Tensor | None = None, divisor: float | None = None) -> Tensor:
    """Mean over rows of KL(teacher_T || student_T) * T^2; logits [..., C], `valid` selects rows.
    `divisor`: divide the sum by it instead of this batch's row count (a global batch's count).
    Computed block by block with its gradient in the same pass (`pipelines/kd_kernel.py`): the
    same value as `F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True)`, without
    the [rows, C] intermediates."""
    return fused_kd_kl(student_logits, teacher_logits, temperature, valid, divisor)


def combine(hard: Tensor, kd: Tensor, cfg: DistillationConfig,
            terms: dict[str, Tensor] | None = None) -> DistillationLoss:
    return DistillationLoss(total=cfg.hard_weight * hard + cfg.kd_weight * kd, hard=hard, kd=kd, terms=terms or {})


def mlm_nsp_loss(student_mlm: Tensor, student_nsp: Tensor | None, teacher_mlm: Tensor, teacher_nsp: Tensor | None,
                 labels: Tensor, next_sentence_label: Tensor, cfg: DistillationConfig,
                 attention_mask: Tensor | None = None, norm: GlobalNorm | None = None) -> DistillationLoss:
    """Pre-training student loss. hard = MLM CE + NSP CE (as BertForPreTraining);
    kd = MLM KL (per token) + NSP KL (per pair), or their mean (`mlm_nsp_kd: mean`). Models without an NSP head
    (DistilBERT): MLM terms only. Without `norm`: means over this batch; with it: this batch's
    share of the global batch's means (the same on any number of workers)."""
    vocab = student_mlm.shape[-1]
    # CE only on the masked rows: same value as over all rows with ignore_index, ~7x less softmax work
    flat_labels = labels.reshape(-1)
    picked = flat_labels != IGNORE_INDEX
    mlm_ce = (F.cross_entropy(_wide(student_mlm.reshape(-1, vocab)[picked]), flat_labels[picked],
                              reduction="mean" if norm is None else "sum")
              if bool(picked.any()) else student_mlm.sum() * 0.0)
    if cfg.mlm_positions == "masked":
        valid = labels != IGNORE_INDEX
        kd_rows = norm.targets if norm is not None else None
    else:
        valid = attention_mask.bool() if attention_mask is not None else None
        kd_rows = norm.tokens if norm is not None else None
    if norm is not None:
        mlm_ce = mlm_ce / max(norm.targets, 1.0)
    mlm_kd = kd_kl(student_mlm, teacher_mlm, cfg.temperature, valid, kd_rows)
    scale = norm.scale if norm is not None else 1.0
    if student_nsp is None or teacher_nsp is None:
        return _scaled(combine(mlm_ce, mlm_kd, cfg, {"ce_mlm": mlm_ce, "kd_mlm": mlm_kd}), scale)
    nsp_ce = F.cross_entropy(_wide(student_nsp.reshape(-1, 2)), next_sentence_label.reshape(-1),
                             reduction="mean" if norm is None else "sum")
    if norm is not None:
        nsp_ce = nsp_ce / max(norm.sequences, 1.0)
    nsp_kd = kd_kl(student_nsp, teacher_nsp, cfg.temperature, divisor=norm.sequences if norm is not None else None)
    kd = mlm_kd + nsp_kd if cfg.mlm_nsp_kd == "sum" else 0.5 * (mlm_kd + nsp_kd)
    terms = {"ce_mlm": mlm_ce, "ce_nsp": nsp_ce, "kd_mlm": mlm_kd, "kd_nsp": nsp_kd}
    return _scaled(combine(mlm_ce + nsp_ce, kd, cfg, terms), scale)


def _scaled(loss: DistillationLoss, scale: float) -> DistillationLoss:
    if scale == 1.0:
        return loss
    return DistillationLoss(total=loss.total * scale, hard=loss.hard * scale, kd=loss.kd * scale,
                            terms={k: v * scale for k, v in loss.terms.items()})


def qa_loss(student_start: Tensor, student_end: Tensor, teacher_start: Tensor, teacher_end: Tensor,
            start_positions: Tensor, end_positions: Tensor, cfg: DistillationConfig) -> DistillationLoss:
    """Extractive QA: hard = mean of start/end CE (positions outside the sequence ignored, as in
    transformers); kd = mean of the start and end KL."""
    seq_len = student_start.shape[-1]
    start = start_positions.clamp(0, seq_len)  # seq_len acts as the ignored index
    end = end_positions.clamp(0, seq_len)
    hard = 0.5 * (F.cross_entropy(_wide(student_start), start, ignore_index=seq_len)
                  + F.cross_entropy(_wide(student_end), end, ignore_index=seq_len))
    kd = 0.5 * (kd_kl(student_start, teacher_start, cfg.temperature)
                + kd_kl(student_end, teacher_end, cfg.temperature))
    return combine(hard, kd, cfg)


def sequence_classification_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                                 cfg: DistillationConfig) -> DistillationLoss:
    """Classification: CE + KL. Regression (one output, e.g. STS-B): MSE to the label and MSE to
    the teacher's prediction (no temperature)."""
    if student_logits.shape[-1] == 1:
        pred = _wide(student_logits.squeeze(-1))
        hard = F.mse_loss(pred, labels.to(pred.dtype))
        kd = F.mse_loss(pred, teacher_logits.detach().squeeze(-1).to(pred.dtype))
    else:
        hard = F.cross_entropy(_wide(student_logits), labels.reshape(-1))
        kd = kd_kl(student_logits, teacher_logits, cfg.temperature)
    return combine(hard, kd, cfg)


LABEL_KEYS = ("labels", "next_sentence_label", "start_positions", "end_positions")


@torch.no_grad()
def teacher_logits(teacher: nn.Module, batch: Mapping[str, Any]) -> Any:
    """Teacher forward in eval mode, no gradients, labels dropped (logits only)."""
    teacher.eval()
    return teacher(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})


def distillation_loss(task: Literal["pretraining", "qa", "classification"], student_out: Any, teacher_out: Any,
                      batch: Mapping[str, Tensor], cfg: DistillationConfig,
                      norm: GlobalNorm | None = None) -> DistillationLoss:
    """Dispatch on the task with transformers model outputs (BertForPreTraining,
    *ForQuestionAnswering, *ForSequenceClassification)."""
    if task == "pretraining":
        return mlm_nsp_loss(mlm_logits(student_out), nsp_logits(student_out),
                            mlm_logits(teacher_out), nsp_logits(teacher_out),
                            batch["labels"], batch["next_sentence_label"], cfg, batch.get("attention_mask"), norm)
    if task == "qa":
        return qa_loss(student_out.start_logits, student_out.end_logits, teacher_out.start_logits,
                       teacher_out.end_logits, batch["start_positions"], batch["end_positions"], cfg)
    if task == "classification":
        return sequence_classification_loss(student_out.logits, teacher_out.logits, batch["labels"], cfg)
    raise ValueError(f"distillation task={task!r} is not one of pretraining, qa, classification")
