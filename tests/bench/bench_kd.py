"""KD step cost benchmark (`make bench-kd`). A script, not a test.

At BERT-Base shape (12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522, sequence 128),
fp32 on the CPU, it times in the same run, interleaved round by round (so drifts in machine load hit
every row alike):
  plain          the teacher stage's step as the worker runs it: student forward,
                 `pretraining_loss` (MLM + NSP cross-entropy), backward
  KD (old loss)  the student stage's step with the straightforward KD loss kept below
                 (`F.log_softmax` of both sides + `F.kl_div`, as pofa computed it before the fused
                 kernel): teacher forward (`teacher_logits`: eval, no grad), student forward,
                 loss, backward
  KD (new loss)  the same step with `pipelines.distillation.mlm_nsp_loss` (the chunked KL of
                 `pipelines/kd_kernel.py`)
  (teacher forward) the teacher's forward alone: 1 + its ratio is the floor of any KD step
The MLM KL runs over every non-padding token (the reference's, `mlm_positions: tokens`).
Batches come from the project's collator (`pipelines/data/collator.py`): dynamic masking (15%, at
most 20 per sequence), [CLS] A [SEP] B [SEP] rows of several lengths, so attention masks carry
padding. No optimizer step: the step is forward + loss + backward. Goal: KD (new loss) <= 1.45x plain.

Ratios use the process's CPU time per step (one torch thread by default), which stays meaningful
on a shared, overloaded machine where wall time does not; the median wall time is printed alongside.
A second, smaller table repeats the rows at the shape of `make bench-sparsity` (hidden 256, 4 layers,
full vocabulary), where the vocabulary head outweighs the encoder.

Usage: python tests/bench/bench_kd.py [--batch 4] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from transformers import BertConfig, BertForPreTraining  # noqa: E402

from pipelines.data.collator import IGNORE_INDEX, CollatorSettings, collate, sample_keys  # noqa: E402
from pipelines.distillation import DistillationConfig, DistillationLoss, mlm_nsp_loss, teacher_logits  # noqa: E402
from pipelines.models.heads import accepted_inputs, mlm_logits, nsp_logits  # noqa: E402
from pipelines.training.losses import pretraining_loss  # noqa: E402

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")  # as workers/train/pretraining_worker.py
PAD, CLS, SEP, MASK = 0, 101, 102, 103  # bert-base-uncased's ids
LENGTHS = (128, 128, 112, 90)  # cycled over the batch: about 10% padding


# -- the straightforward KD loss (before the fused kernel), for comparison ----------------------
def reference_kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                    valid: torch.Tensor | None = None, divisor: float | None = None) -> torch.Tensor:
    classes = student.shape[-1]
    s, t = student.reshape(-1, classes), teacher.detach().reshape(-1, classes)
    if valid is not None:
        keep = valid.reshape(-1).bool()
        s, t = s[keep], t[keep]
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / (divisor or s.shape[0]) * temperature**2


def reference_mlm_nsp_loss(s_mlm, s_nsp, t_mlm, t_nsp, labels, nsp_labels, cfg: DistillationConfig,
                           attention_mask) -> DistillationLoss:
    vocab = s_mlm.shape[-1]
    flat = labels.reshape(-1)
    picked = flat != IGNORE_INDEX
    mlm_ce = F.cross_entropy(s_mlm.reshape(-1, vocab)[picked].float(), flat[picked])
    valid = attention_mask.bool() if cfg.mlm_positions == "tokens" else labels != IGNORE_INDEX
    mlm_kd = reference_kd_kl(s_mlm, t_mlm, cfg.temperature, valid)
    nsp_ce = F.cross_entropy(s_nsp.float(), nsp_labels.reshape(-1))
    nsp_kd = reference_kd_kl(s_nsp, t_nsp, cfg.temperature)
    hard, kd = mlm_ce + nsp_ce, 0.5 * (mlm_kd + nsp_kd)
    return DistillationLoss(total=cfg.hard_weight * hard + cfg.kd_weight * kd, hard=hard, kd=kd)


# -- inputs ---------------------------------------------------------------------------------------
def collated_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] A [SEP] B [SEP] rows of LENGTHS (cut to `seq`), through the project's collator."""
    rng = np.random.default_rng(seed)
    ids, types = [], []
    for i in range(batch):
        n = min(seq, LENGTHS[i % len(LENGTHS)])
        a = (n - 3) // 2
        b = n - 3 - a
        body = rng.integers(1000, vocab, size=n - 3).tolist()
        ids.append([CLS] + body[:a] + [SEP] + body[a:] + [SEP])
        types.append([0] * (a + 2) + [1] * (b + 1))
    table = pa.table({"input_ids": ids, "token_type_ids": types,
                      "next_sentence_label": np.arange(batch) % 2})
    settings = CollatorSettings(pad_id=PAD, mask_id=MASK, vocab_size=vocab, special_ids=frozenset({PAD, CLS, SEP, MASK}),
                                masking="dynamic", masked_lm_prob=0.15, max_predictions_per_seq=20)
    out = collate(table, settings, sample_keys(seed, 0, np.arange(batch)))
    out.pop("special_tokens_mask")
    return out


def build(cfg: BertConfig, seed: int) -> BertForPreTraining:
    torch.manual_seed(seed)
    return BertForPreTraining(cfg)


# -- the steps ------------------------------------------------------------------------------------
class Steps:
    def __init__(self, cfg: BertConfig, batch: dict[str, torch.Tensor]) -> None:
        self.student = build(cfg, 0).train()
        self.teacher = build(cfg, 1).eval().requires_grad_(False)  # as BaseWorker.frozen_teacher
        self.batch = batch
        self.inputs = accepted_inputs(self.student, batch, MODEL_INPUTS)
        self.kd_cfg = DistillationConfig()  # 0.5 / 0.5, T = 2, MLM KL over all tokens

    def _done(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.student.zero_grad(set_to_none=True)

    def plain(self) -> None:
        out = self.student(**self.inputs)
        self._done(pretraining_loss(out, self.batch)[0])

    def _kd(self, loss_fn: Callable[..., Any]) -> None:
        """The student stage's step with `loss_fn` as its MLM+NSP distillation loss."""
        t_out = teacher_logits(self.teacher, self.inputs)
        out = self.student(**self.inputs)
        b = self.batch
        loss = loss_fn(mlm_logits(out), nsp_logits(out), mlm_logits(t_out), nsp_logits(t_out),
                       b["labels"], b["next_sentence_label"], self.kd_cfg, b["attention_mask"])
        self._done(loss.total)

    def kd_old(self) -> None:
        self._kd(reference_mlm_nsp_loss)

    def kd_new(self) -> None:
        self._kd(mlm_nsp_loss)

    def teacher_only(self) -> None:
        teacher_logits(self.teacher, self.inputs)

    def rows(self) -> list[tuple[str, Callable[[], None]]]:
        return [("plain step (MLM+NSP)", self.plain), ("KD step, old loss", self.kd_old),
                ("KD step, new loss", self.kd_new), ("(teacher forward)", self.teacher_only)]

    @torch.no_grad()
    def agreement(self) -> tuple[float, float]:
        """|new - old| of the KD loss on this batch's real logits, and the loss itself."""
        t_out = teacher_logits(self.teacher, self.inputs)
        out = self.student(**self.inputs)
        b = self.batch
        args = (mlm_logits(out), nsp_logits(out), mlm_logits(t_out), nsp_logits(t_out), b["labels"],
                b["next_sentence_label"], self.kd_cfg, b["attention_mask"])
        old, new = reference_mlm_nsp_loss(*args).total, mlm_nsp_loss(*args).total
        return abs(float(new) - float(old)), float(old)


def measure(steps: Steps, rounds: int, warmup: int) -> dict[str, tuple[float, float]]:
    """name -> (median CPU s, median wall s) per step, rows interleaved round by round."""
    cpu: dict[str, list[float]] = {name: [] for name, _ in steps.rows()}
    wall: dict[str, list[float]] = {name: [] for name, _ in steps.rows()}
    for r in range(warmup + rounds):
        for name, fn in steps.rows():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            if r >= warmup:
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in cpu}


def table(title: str, result: dict[str, tuple[float, float]], goal: float | None) -> None:
    base = result["plain step (MLM+NSP)"][0]
    print(title)
    print(f"{'step':<22} {'cpu s/step':>11} {'x plain':>8} {'wall s/step':>12}  goal")
    for name, (c, w) in result.items():
        note = ""
        if goal is not None and name == "KD step, new loss":
            note = f"<= {goal:.2f}: {'met' if c / base <= goal else 'MISSED'}"
        print(f"{name:<22} {c:>11.3f} {c / base:>8.3f} {w:>12.3f}  {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds at BERT-Base shape")
    ap.add_argument("--small-rounds", type=int, default=8, help="timed rounds at the small shape (0: skip)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = 30522
    batch = collated_batch(args.batch, args.seq, vocab)
    real = int(batch["attention_mask"].sum())
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    print(f"bench-kd: torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, CPU; batch "
          f"{args.batch}x{batch['input_ids'].shape[1]} from the collator: {real} real tokens, {targets} MLM targets; "
          f"KD: T=2, weights 0.5/0.5, MLM KL over all real tokens; forward + loss + backward, no optimizer step")

    base_cfg = BertConfig(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, max_position_embeddings=512)
    steps = Steps(base_cfg, batch)
    diff, value = steps.agreement()
    print(f"KD loss on this batch: old {value:.6f}, |new - old| = {diff:.2e}")
    result = measure(steps, args.rounds, args.warmup)
    print()
    table(f"BERT-Base (12 layers, hidden 768, vocab {vocab}), median of {args.rounds} interleaved rounds",
          result, goal=1.45)
    del steps

    if args.small_rounds > 0:
        small_cfg = BertConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=1024, max_position_embeddings=512)
        small = measure(Steps(small_cfg, batch), args.small_rounds, args.warmup)
        print()
        table(f"for context, the bench-sparsity shape (4 layers, hidden 256, vocab {vocab}: the head outweighs "
              f"the encoder), median of {args.small_rounds} rounds", small, goal=None)


if __name__ == "__main__":
    main()
