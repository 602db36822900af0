"""KD losses: limits of the weights, the KL term by hand, gradients by finite differences."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining

from pipelines.distillation import (DistillationConfig, distillation_loss, kd_kl, mlm_nsp_loss, qa_loss,
                                    sequence_classification_loss, teacher_logits)

HARD_ONLY = DistillationConfig(hard_weight=1.0, kd_weight=0.0)
KD_ONLY = DistillationConfig(hard_weight=0.0, kd_weight=1.0)


def kl_by_hand(s, t, temp):
    p_t = torch.softmax(t / temp, -1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2


def tiny_pretraining(seed):
    torch.manual_seed(seed)
    return BertForPreTraining(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32))


def pretraining_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 10), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[:, 5] = ids[:, 5]
    attention = torch.ones_like(ids)
    attention[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": attention, "labels": labels,
            "next_sentence_label": torch.tensor([0, 1, 0])}


def test_mlm_nsp_limits_match_hard_loss_and_kl():
    student, teacher = tiny_pretraining(0), tiny_pretraining(1)
    batch = pretraining_batch()
    s_out = student(**batch)
    t_out = teacher_logits(teacher, batch)
    hard = distillation_loss("pretraining", s_out, t_out, batch, HARD_ONLY)
    assert hard.total.item() == pytest.approx(s_out.loss.item(), rel=1e-5)  # = BertForPreTraining's own loss
    kd = distillation_loss("pretraining", s_out, t_out, batch, KD_ONLY)
    valid = batch["attention_mask"].bool()
    expected = 0.5 * (kl_by_hand(s_out.prediction_logits[valid], t_out.prediction_logits[valid], 2.0)
                      + kl_by_hand(s_out.seq_relationship_logits, t_out.seq_relationship_logits, 2.0))
    assert kd.total.item() == pytest.approx(expected.item(), rel=1e-4)
    default = distillation_loss("pretraining", s_out, t_out, batch, DistillationConfig())
    assert default.total.item() == pytest.approx(0.5 * hard.hard.item() + 0.5 * kd.kd.item(), rel=1e-5)
    masked = distillation_loss("pretraining", s_out, t_out, batch, DistillationConfig(mlm_positions="masked"))
    assert masked.kd.item() != pytest.approx(default.kd.item())


def test_teacher_runs_in_eval_without_grad():
    teacher = tiny_pretraining(1)
    teacher.train()
    out = teacher_logits(teacher, pretraining_batch())
    assert not teacher.training and not out.prediction_logits.requires_grad and out.loss is None


def test_identical_logits_give_zero_kd_and_t_squared_scaling():
    x = torch.randn(6, 5)
    assert kd_kl(x, x, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    for temp in (1.0, 2.0, 4.0):
        assert kd_kl(s, t, temp).item() == pytest.approx(kl_by_hand(s, t, temp).item(), rel=1e-5)


def test_qa_and_classification_limits():
    s_start, s_end, t_start, t_end = (torch.randn(4, 9) for _ in range(4))
    starts, ends = torch.tensor([1, 3, 50, 0]), torch.tensor([2, 4, 50, 8])  # 50: outside, ignored
    hard = qa_loss(s_start, s_end, t_start, t_end, starts, ends, HARD_ONLY)
    expected = 0.5 * (F.cross_entropy(s_start, starts.clamp(0, 9), ignore_index=9)
                      + F.cross_entropy(s_end, ends.clamp(0, 9), ignore_index=9))
    assert hard.total.item() == pytest.approx(expected.item(), rel=1e-6)
    kd = qa_loss(s_start, s_end, t_start, t_end, starts, ends, KD_ONLY)
    assert kd.total.item() == pytest.approx(0.5 * (kl_by_hand(s_start, t_start, 2.0)
                                                   + kl_by_hand(s_end, t_end, 2.0)).item(), rel=1e-5)
    logits, teacher, labels = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    assert sequence_classification_loss(logits, teacher, labels, HARD_ONLY).total.item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert sequence_classification_loss(logits, teacher, labels, KD_ONLY).total.item() == pytest.approx(
        kl_by_hand(logits, teacher, 2.0).item(), rel=1e-5)
    reg = sequence_classification_loss(torch.randn(5, 1), torch.randn(5, 1), torch.randn(5), DistillationConfig())
    assert reg.total.item() == pytest.approx(0.5 * reg.hard.item() + 0.5 * reg.kd.item())


def test_gradients_match_finite_differences_on_a_tiny_model():
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64)
    teacher = torch.randn(6, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    weight = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    cfg = DistillationConfig(hard_weight=0.3, kd_weight=0.7, temperature=2.5)

    def loss(w, b):  # a tiny linear student
        return sequence_classification_loss(F.linear(x, w, b), teacher, labels, cfg).total

    assert torch.autograd.gradcheck(loss, (weight, bias), eps=1e-6, atol=1e-6)

    mlm = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    nsp = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t_mlm, t_nsp = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    mlm_labels = torch.tensor([[-100, 3, -100, 1, -100], [2, -100, -100, -100, 6]])
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])

    def pre(m, n):
        return mlm_nsp_loss(m, n, t_mlm, t_nsp, mlm_labels, torch.tensor([1, 0]), DistillationConfig(), attn).total

    assert torch.autograd.gradcheck(pre, (mlm, nsp), eps=1e-6, atol=1e-6)
