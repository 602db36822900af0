"""Dense MLM + NSP loss and the counts behind the validation metrics (as BertForPreTraining)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.data.collator import IGNORE_INDEX
from pipelines.models.heads import mlm_logits as _mlm, nsp_logits as _nsp


@dataclass(frozen=True)
class GlobalNorm:
    """The whole global batch's counts, for a loss that does not depend on how the batch is split
    into ranks and micro-batches: each micro-batch contributes its sums divided by these, times
    `scale` (= workers x accumulation steps, which DeepSpeed's gradient averaging divides by)."""

    targets: float  # MLM targets
    tokens: float  # real (non-padding) tokens
    sequences: float
    scale: float = 1.0


def pretraining_loss(outputs: Any, batch: Mapping[str, Tensor],
                     norm: GlobalNorm | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(total, mlm, nsp): cross-entropies on the model's MLM and NSP logits (nsp = 0 without an NSP head).
    Without `norm`: means over this batch; with it: this batch's share of the global batch's means."""
    mlm_logits = _mlm(outputs).float()
    reduction = "mean" if norm is None else "sum"
    mlm = F.cross_entropy(mlm_logits.reshape(-1, mlm_logits.shape[-1]), batch["labels"].reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction=reduction)
    head = _nsp(outputs)
    nsp = (mlm.detach() * 0.0 if head is None else
           F.cross_entropy(head.float().reshape(-1, 2), batch["next_sentence_label"].reshape(-1), reduction=reduction))
    if norm is not None:
        mlm = mlm / max(norm.targets, 1.0) * norm.scale
        nsp = nsp / max(norm.sequences, 1.0) * norm.scale
    return mlm + nsp, mlm, nsp


@torch.no_grad()
def pretraining_counts(outputs: Any, batch: Mapping[str, Tensor]) -> Tensor:
    """Sums to all-reduce across ranks: [mlm loss sum, mlm correct, mlm count, nsp loss sum, nsp correct, nsp count]."""
    mlm_logits = _mlm(outputs).float()
    labels = batch["labels"].reshape(-1)
    flat = mlm_logits.reshape(-1, mlm_logits.shape[-1])
    keep = labels != IGNORE_INDEX
    mlm_sum = F.cross_entropy(flat[keep], labels[keep], reduction="sum") if keep.any() else flat.sum() * 0
    mlm_correct = (flat[keep].argmax(-1) == labels[keep]).sum()
    nsp_labels = batch["next_sentence_label"].reshape(-1)
    head = _nsp(outputs)
    if head is None:  # MLM-only model: NSP counts stay 0 (nsp metrics read 0)
        nsp_sum, nsp_correct, nsp_labels = mlm_sum * 0.0, torch.zeros(()), nsp_labels[:0]
    else:
        nsp_logits = head.float()
        nsp_sum = F.cross_entropy(nsp_logits.reshape(-1, 2), nsp_labels, reduction="sum")
        nsp_correct = (nsp_logits.argmax(-1) == nsp_labels).sum()
    return torch.stack([mlm_sum, mlm_correct.float(), keep.sum().float(), nsp_sum, nsp_correct.float(),
                        torch.tensor(float(len(nsp_labels)))]).double()


def metrics_from_counts(counts: Tensor, prefix: str = "val") -> dict[str, float]:
    mlm_sum, mlm_correct, mlm_n, nsp_sum, nsp_correct, nsp_n = (float(x) for x in counts.tolist())
    mlm_loss = mlm_sum / max(mlm_n, 1.0)
    nsp_loss = nsp_sum / max(nsp_n, 1.0)
    return {f"{prefix}/loss": mlm_loss + nsp_loss, f"{prefix}/mlm_loss": mlm_loss, f"{prefix}/nsp_loss": nsp_loss,
            f"{prefix}/mlm_acc": mlm_correct / max(mlm_n, 1.0), f"{prefix}/nsp_acc": nsp_correct / max(nsp_n, 1.0)}
