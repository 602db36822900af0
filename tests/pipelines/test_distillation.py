"""KD losses: limits of the weights, the KL term by hand, gradients by finite differences, and the
chunked KL kernel (`pipelines/kd_kernel.py`) against the straightforward `F.log_softmax` + `F.kl_div`."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining

import pipelines.distillation as distillation
import pipelines.kd_kernel as kd_kernel
from pipelines.distillation import (DistillationConfig, distillation_loss, kd_kl, mlm_nsp_loss, qa_loss,
                                    sequence_classification_loss, teacher_logits)
from pipelines.training.losses import GlobalNorm

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
    # the reference sums the two heads' KL terms (run_mlm.py: logit weights [1, 1])
    expected = (kl_by_hand(s_out.prediction_logits[valid], t_out.prediction_logits[valid], 2.0)
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


# -- the chunked KL kernel against the straightforward implementation ------------------------------
def reference_kd_kl(student, teacher, temperature, valid=None, divisor=None):
    """pofa's KL before the kernel: log-softmax of both sides, F.kl_div, autograd for the gradient."""
    classes = student.shape[-1]
    s, t = student.reshape(-1, classes), teacher.detach().reshape(-1, classes)
    if valid is not None:
        keep = valid.reshape(-1).to(torch.bool)
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:
        return student.sum() * 0.0
    wide = (lambda x: x.float()) if s.dtype in (torch.float16, torch.bfloat16) else (lambda x: x)
    log_p_s = F.log_softmax(wide(s) / temperature, dim=-1)
    log_p_t = F.log_softmax(wide(t) / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) / (divisor or s.shape[0]) * temperature**2


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 rows of a 101-class vocabulary: every test runs several blocks and a partial last one."""
    monkeypatch.setattr(kd_kernel, "_BLOCK_ELEMENTS", 3 * 101)


def _logits(shape, seed, scale=4.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("divisor", [None, 57.0])
def test_kernel_matches_reference_value_and_gradient(small_blocks, temperature, with_valid, divisor):
    student = _logits((4, 11, 101), 0).requires_grad_()
    teacher = _logits((4, 11, 101), 1)
    valid = None
    if with_valid:
        valid = torch.ones(4, 11, dtype=torch.bool)
        valid[0, 7:] = False
        valid[2, 3:] = False
        valid[3, 0] = False
    upstream = torch.tensor(0.37)  # as the loss weights scale it in a real step
    new = kd_kernel.fused_kd_kl(student, teacher, temperature, valid, divisor)
    (g_new,) = torch.autograd.grad(new * upstream, student)
    old = reference_kd_kl(student, teacher, temperature, valid, divisor)
    (g_old,) = torch.autograd.grad(old * upstream, student)
    assert new.dtype == old.dtype == torch.float32
    assert old.item() > 0.1  # the logits differ: a real KL, not a trivial zero
    assert abs(new.item() - old.item()) <= 1e-5 * max(1.0, abs(old.item()))
    torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-6 * g_old.abs().max().item())
    if with_valid:  # padding rows get no gradient
        assert g_new[0, 7:].abs().max().item() == 0.0 and g_new[3, 0].abs().max().item() == 0.0
        assert g_new[0, :7].abs().max().item() > 0.0


def test_kernel_gradcheck_fp64_with_rows_divisor_and_temperature(monkeypatch):
    monkeypatch.setattr(kd_kernel, "_BLOCK_ELEMENTS", 3 * 13)  # blocks of 3 rows: several, a partial last one
    student = _logits((3, 5, 13), 2, scale=2.0, dtype=torch.float64).requires_grad_()
    teacher = _logits((3, 5, 13), 3, scale=2.0, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda s: kd_kernel.fused_kd_kl(s, teacher, 2.5, valid, 9.0), (student,),
                                    eps=1e-6, atol=1e-7)
    value = kd_kernel.fused_kd_kl(student, teacher, 2.5, valid, 9.0)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(reference_kd_kl(student, teacher, 2.5, valid, 9.0).item(), rel=1e-12)


def test_kernel_teacher_gets_no_gradient_and_empty_selection_keeps_the_graph():
    student = _logits((2, 3, 7), 4).requires_grad_()
    teacher = _logits((2, 3, 7), 5).requires_grad_()
    kd_kernel.fused_kd_kl(student, teacher, 2.0).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum().item() > 0
    empty = kd_kernel.fused_kd_kl(student, teacher, 2.0, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_upcasts_like_the_reference(small_blocks, dtype):
    student = _logits((3, 4, 101), 6, dtype=dtype).requires_grad_()
    teacher = _logits((3, 4, 101), 7, dtype=dtype)
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    new = kd_kernel.fused_kd_kl(student, teacher, 2.0, valid)
    (g_new,) = torch.autograd.grad(new, student)
    old = reference_kd_kl(student, teacher, 2.0, valid)
    (g_old,) = torch.autograd.grad(old, student)
    assert new.dtype == torch.float32 and g_new.dtype == dtype
    assert abs(new.item() - old.item()) <= 1e-5 * max(1.0, abs(old.item()))
    torch.testing.assert_close(g_new.float(), g_old.float(), rtol=2e-2, atol=1e-2 * g_old.abs().max().item())


@pytest.mark.parametrize("positions", ["tokens", "masked"])
@pytest.mark.parametrize("with_norm", [False, True])
def test_mlm_nsp_loss_matches_the_straightforward_loss(small_blocks, monkeypatch, positions, with_norm):
    """Today's mlm_nsp_loss with the kernel vs. the same function with the straightforward KL:
    total, hard and kd within 1e-5, gradients on the student's MLM and NSP logits close."""
    s_mlm = _logits((3, 9, 101), 8).requires_grad_()
    s_nsp = _logits((3, 2), 9).requires_grad_()
    t_mlm, t_nsp = _logits((3, 9, 101), 10), _logits((3, 2), 11)
    labels = torch.full((3, 9), -100)
    labels[0, [1, 4]] = torch.tensor([5, 17])
    labels[1, 2] = 40
    labels[2, [3, 6, 7]] = torch.tensor([1, 2, 100])
    attention = torch.ones(3, 9, dtype=torch.long)
    attention[1, 6:] = 0
    attention[2, 8:] = 0
    nsp_labels = torch.tensor([0, 1, 1])
    cfg = DistillationConfig(hard_weight=0.4, kd_weight=0.6, temperature=3.0, mlm_positions=positions)
    norm = GlobalNorm(targets=13.0, tokens=61.0, sequences=5.0, scale=2.0) if with_norm else None

    def run():
        loss = mlm_nsp_loss(s_mlm, s_nsp, t_mlm, t_nsp, labels, nsp_labels, cfg, attention, norm)
        return loss, torch.autograd.grad(loss.total, (s_mlm, s_nsp))

    new, (g_mlm, g_nsp) = run()
    monkeypatch.setattr(distillation, "kd_kl", reference_kd_kl)
    old, (r_mlm, r_nsp) = run()
    assert old.kd.item() > 0.1
    for part in ("total", "hard", "kd"):
        a, b = getattr(new, part).item(), getattr(old, part).item()
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), part
    torch.testing.assert_close(g_mlm, r_mlm, rtol=1e-4, atol=1e-6 * r_mlm.abs().max().item())
    torch.testing.assert_close(g_nsp, r_nsp, rtol=1e-4, atol=1e-6 * r_nsp.abs().max().item())
    if positions == "tokens":  # padding rows carry no KD gradient and are no MLM target
        assert g_mlm[1, 6:].abs().max().item() == 0.0
