"""pofa's method against Intel's reference implementation of Prune OFA, in numbers: the LR rewinding
multiplier of the BERT-Base recipe, the pretraining KD total, and pruned weights that keep their
stored values and come back (the reference restated in `reference_pruneofa.py`, with the files it
follows)."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from orchestrator.recipe.load import load_recipe
from pipelines.distillation import DistillationConfig, mlm_nsp_loss
from pipelines.sparsity import PruningCallback, PruningConfig
from pipelines.sparsity.lr_rewind import rewinding_lr_multiplier
from pipelines.training.schedule import make_lr_fn, warmup_steps
from tests.pipelines import reference_pruneofa as ref

BERT_BASE = "bert-base-uncased-sparse-90-unstructured-pruneofa"


@pytest.fixture(scope="module")
def bert_base_lr():
    student = load_recipe(BERT_BASE).student
    return student, make_lr_fn(student.train_config(), student.pruning)


@pytest.mark.parametrize("step, multiplier", [
    (0, 0.0), (999, 0.999), (1000, 50_000 / 49_000), (1500, 49_500 / 49_000), (49_999, 49_001 / 49_000),
    (50_000, 50_000 / 49_000), (80_000, 20_000 / 49_000), (99_999, 1 / 49_000)])
def test_bert_base_recipe_lr_is_the_references_rewinding(bert_base_lr, step, multiplier):
    student, lr = bert_base_lr
    assert (student.max_steps, warmup_steps(student.max_steps, student.warmup_ratio)) == (100_000, 1_000)
    expected = ref.lr_multiplier(step, 1_000, 100_000, 0, 50_000, 1_000)  # run_mlm.py: the policy window
    assert expected == pytest.approx(multiplier, rel=1e-12)
    assert lr(step) == pytest.approx(student.learning_rate * multiplier, rel=1e-12)


def test_whole_curve_against_the_reference_and_the_old_semantics(bert_base_lr):
    student, lr = bert_base_lr
    steps = range(100_000)
    reference = [ref.lr_multiplier(t, 1_000, 100_000, 0, 50_000, 1_000) for t in steps]
    ours = [lr(t) / student.learning_rate for t in steps]
    assert max(abs(a - b) for a, b in zip(reference, ours)) < 1e-12
    assert sum(reference) / len(reference) == pytest.approx(0.755, abs=1e-3)
    # pofa before 0.2: the pruning window 0..80k and a clamp at 1 (the curve issue 22 measured)
    old = [rewinding_lr_multiplier(t, 1_000, 100_000, 0, 80_000, 1_000, clamp=True) for t in steps]
    assert sum(old) / len(old) == pytest.approx(0.900, abs=1e-3)
    assert old[90_000] == pytest.approx(10_000 / 19_000)
    assert sum(abs(a - b) > 1e-12 for a, b in zip(reference, old)) == 98_999
    old_lr = make_lr_fn(student.train_config(), student.pruning.model_copy(
        update={"lr_rewind_window": "pruning", "lr_rewind_clamp": True}))
    assert [old_lr(t) / student.learning_rate for t in (1_000, 90_000)] == pytest.approx([1.0, old[90_000]])


def _logits(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch, seq, vocab = 4, 12, 50
    attention = torch.ones(batch, seq, dtype=torch.long)
    attention[1, 9:] = 0
    attention[3, 5:] = 0
    labels = torch.full((batch, seq), -100)
    labels[:, 2] = torch.randint(0, vocab, (batch,), generator=g)
    labels[0, 7] = 3
    return (torch.randn(batch, seq, vocab, generator=g) * 3, torch.randn(batch, 2, generator=g) * 2,
            torch.randn(batch, seq, vocab, generator=g) * 3, torch.randn(batch, 2, generator=g) * 2,
            labels, torch.tensor([0, 1, 1, 0]), attention)


def test_pretraining_kd_total_is_the_references():
    s_mlm, s_nsp, t_mlm, t_nsp, labels, nsp, attention = _logits()
    expected = ref.pretraining_kd_loss(s_mlm, s_nsp, t_mlm, t_nsp, labels, nsp, attention)
    ours = mlm_nsp_loss(s_mlm, s_nsp, t_mlm, t_nsp, labels, nsp, DistillationConfig(), attention)
    torch.testing.assert_close(ours.total, expected, rtol=1e-6, atol=1e-6)
    terms = {k: float(v) for k, v in ours.terms.items()}
    assert float(ours.total) == pytest.approx(0.5 * (terms["ce_mlm"] + terms["ce_nsp"])
                                              + 0.5 * (terms["kd_mlm"] + terms["kd_nsp"]), rel=1e-6)
    # pofa before 0.2 (`mlm_nsp_kd: mean`) had exactly half the KD term
    old = mlm_nsp_loss(s_mlm, s_nsp, t_mlm, t_nsp, labels, nsp, DistillationConfig(mlm_nsp_kd="mean"), attention)
    assert float(ours.kd) / float(old.kd) == pytest.approx(2.0, rel=1e-9)
    assert float(ours.hard) == pytest.approx(float(old.hard), rel=1e-9)


def _model(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (8, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


# policy 0..10, masks rescored every 2 steps until 20: a ramp, then swaps at constant sparsity
SCHEDULE = {"kind": "cubic", "policy_begin_step": 0, "policy_end_step": 10, "begin_pruning_step": 0,
            "end_pruning_step": 20, "pruning_frequency": 2, "initial_sparsity": 0.0, "final_sparsity": 0.9}
STEPS = 30


def _run_reference(names: list[str]):
    model = _model()
    pruning = ref.PrunedLinears(model, names, policy=(0, 10), window=(0, 20), frequency=2, initial=0.0, target=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.01)
    masks_after, regrown = {}, 0
    for step in range(STEPS):
        model(**_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
        before = pruning.masks()
        if pruning.step():
            after = pruning.masks()
            regrown += sum(int((~before[n] & after[n]).sum()) for n in names)
            masks_after[step + 1] = after  # in force from the forward of update step + 2
    return pruning, masks_after, regrown


def _run_pofa(semantics: str):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.01)
    cb = PruningCallback(model, PruningConfig.model_validate({"schedule": SCHEDULE, "pruned_weights": semantics}),
                         optimizer=opt)
    masks_at, regrown = {}, 0
    for step in range(STEPS):
        if cb.on_step_begin(step):
            masks_at[step] = {n: m.clone() for n, m in cb.masks.items()}
            regrown += cb.regrown
        model(**_batch(step)).loss.backward()
        cb.before_step()
        opt.step()
        opt.zero_grad()
        cb.on_step_end(step)
    return model, cb, masks_at, regrown


def test_pruned_weights_keep_their_values_and_come_back_as_in_the_reference():
    model, cb, masks_at, regrown = _run_pofa("keep")
    reference, ref_masks, ref_regrown = _run_reference(cb.names)
    # the same updates at the same steps, the same masks, the same weights after 30 steps
    assert sorted(masks_at) == sorted(ref_masks) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21]
    for step, masks in ref_masks.items():
        for name in cb.names:
            assert torch.equal(masks_at[step][name], masks[name]), (step, name)
    stored, ref_stored = cb.enforcer.read_weights(cb.names), reference.stored()
    for name in cb.names:
        module = reference.modules[name]
        torch.testing.assert_close(stored[name], ref_stored[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.get_parameter(name).detach(), module.weight_original * module.weight_mask,
                                   rtol=0, atol=1e-6)
        assert (model.get_parameter(name)[~cb.masks[name]] == 0).all()
        assert (stored[name][~cb.masks[name]] != 0).any()  # the stored values live on
    assert regrown == ref_regrown > 0
    assert int(sum((~m).sum() for m in cb.masks.values())) == sum(int(0.9 * m.numel()) for m in cb.masks.values())


def test_zero_semantics_never_regrow():
    _, cb, masks_at, regrown = _run_pofa("zero")
    assert regrown == 0
    steps = sorted(masks_at)
    for a, b in zip(steps, steps[1:]):  # masks only grow
        for name in cb.names:
            assert not (~masks_at[a][name] & masks_at[b][name]).any()


def test_a_weight_pruned_at_one_update_comes_back_at_a_later_one():
    """One weight, a constant gradient driving it through zero: pruned when small, its Adam momentum
    carries the stored value on, and the next update keeps it again (the reference's regrowth)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.5, 0.3, 0.2, 0.4]]))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    cfg = PruningConfig.model_validate({
        "include": [r"^0\."], "exclude": [],
        "schedule": {"kind": "cubic", "policy_begin_step": 0, "policy_end_step": 1, "begin_pruning_step": 5,
                     "end_pruning_step": 10, "pruning_frequency": 5, "final_sparsity": 0.5}})
    cb = PruningCallback(model, cfg, optimizer=opt)
    x = torch.tensor([[-1.0, 0.0, 0.0, 0.0]])  # d(loss)/d(w0) = -1: w0 rises by ~lr a step
    kept = {}
    for step in range(12):
        if cb.on_step_begin(step):
            kept[step] = cb.masks["0.weight"][0].tolist()
        model(x).sum().backward()
        cb.before_step()
        opt.step()
        opt.zero_grad()
        cb.on_step_end(step)
    # schedule steps 5 and 10 -> masks before updates 7 and 12
    assert kept[6] == [False, True, False, True]  # w0 ~ 0.1 after 6 updates: pruned (with w2 = 0.2)
    assert kept[11] == [True, False, False, True]  # its momentum took it past 0.3: back, w1 pruned instead
    assert cb.regrown == 1
