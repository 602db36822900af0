"""The pruning callback on a plain torch model: GMP to target, pattern lock under training,
checkpoint round trip, masks by name, and the report."""
import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pipelines.sparsity import PruningCallback, PruningConfig, prunable_weights, sparsity_report, write_report
from pipelines.sparsity.allocation import prune_count


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=32))


def batch(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


GMP = {"schedule": {"kind": "cubic", "policy_begin_step": 0, "policy_end_step": 10, "begin_pruning_step": 0,
                    "end_pruning_step": 10, "pruning_frequency": 5, "final_sparsity": 0.9}}


def train(model, opt, cb, steps, on_grad=None):
    for step in steps:
        cb.on_step_begin(step)
        model(**batch(step)).loss.backward()
        if on_grad:
            on_grad()
        cb.before_step()
        opt.step()
        opt.zero_grad()
        cb.on_step_end(step)


@pytest.mark.parametrize("semantics", ["keep", "zero"])
def test_gmp_reaches_exact_target(semantics):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = PruningCallback(model, PruningConfig.model_validate({**GMP, "pruned_weights": semantics}), optimizer=opt)
    seen = []
    for step in range(15):
        if cb.on_step_begin(step):
            seen.append((step, round(cb.sparsity, 4)))
        model(**batch(step)).loss.backward()
        cb.before_step()
        opt.step()
        opt.zero_grad()
        cb.on_step_end(step)
    # schedule steps 0, 5, 10: computed after the update that follows them (the reference's timing)
    assert seen == [(1, 0.0), (6, 0.7875), (11, 0.9)]
    for name in cb.names:
        p = model.get_parameter(name)
        assert int((p == 0).sum()) == prune_count(p.numel(), 0.9)
        for key in ("exp_avg", "exp_avg_sq"):  # zero: the moments follow the mask; keep: they live on
            assert (opt.state[p][key][~cb.masks[name]] == 0).all() == (semantics == "zero")
    metrics = cb.metrics()
    assert metrics["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
    assert metrics["sparsity/target"] == pytest.approx(0.9)
    assert metrics[f"sparsity/layer/{cb.names[0]}"] == pytest.approx(0.9, abs=1e-3)


def test_pattern_lock_is_bit_identical_after_50_steps():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prune = PruningCallback(model, PruningConfig.model_validate(
        {"schedule": {"kind": "one_shot", "begin_pruning_step": 0, "final_sparsity": 0.9}}), optimizer=opt)
    prune.on_step_begin(0)
    names = prune.names
    # a fresh optimizer and a pattern-lock callback, as in the fine-tuning stage
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lock = PruningCallback(model, PruningConfig.model_validate({"schedule": {"kind": "constant"}}), optimizer=opt)
    before = {n: (model.get_parameter(n) == 0).clone() for n in names}
    grad_on_pruned = []

    def record():
        grad_on_pruned.append(sum(float(model.get_parameter(n).grad[before[n]].abs().sum()) for n in names))

    train(model, opt, lock, range(50), on_grad=record)
    assert len(grad_on_pruned) == 50 and min(grad_on_pruned) > 0  # pruned weights had real gradients
    for n in names:
        assert torch.equal(model.get_parameter(n) == 0, before[n]), n
    assert lock.metrics()["sparsity/global"] == pytest.approx(0.9, abs=1e-3)


def test_state_dict_round_trip_restores_masks_and_position(tmp_path):
    cfg = PruningConfig.model_validate(GMP)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = PruningCallback(model, cfg, optimizer=opt)
    train(model, opt, cb, range(8))
    cb.apply()  # as before every save: must not disturb the stored values
    stored = cb.enforcer.read_weights(cb.names)
    torch.save({"model": model.state_dict(), "pruning": cb.state_dict()}, tmp_path / "ck.pt")

    model2 = tiny_model(seed=1)  # dense and different: masks must come from the checkpoint
    ck = torch.load(tmp_path / "ck.pt")
    cb2 = PruningCallback(model2, cfg, optimizer=torch.optim.AdamW(model2.parameters(), lr=1e-2))
    cb2.load_state_dict(ck["pruning"])
    assert cb2.last_update_step == 6 and cb2.sparsity == pytest.approx(0.7875)
    assert all(torch.equal(cb.masks[n], cb2.masks[n]) for n in cb.names)
    restored = cb2.enforcer.read_weights(cb2.names)
    for n in cb.names:  # masks applied on load, even to weights that were not pruned yet
        assert (model2.get_parameter(n)[~cb2.masks[n]] == 0).all()
        assert torch.equal(restored[n], stored[n])  # the stored values of pruned weights came back too
        assert (restored[n][~cb2.masks[n]] != 0).any()
    assert cb2.on_step_begin(8) is False  # no recomputation outside the schedule
    assert cb2.on_step_begin(6) is False  # replaying the checkpointed update step does not recompute
    assert cb2.on_step_begin(11) is True and cb2.sparsity == pytest.approx(0.9)


def test_an_old_pruning_state_is_refused_with_what_to_do():
    cb = PruningCallback(tiny_model(), PruningConfig.model_validate(GMP))
    with pytest.raises(ValueError, match="--redo student"):
        cb.load_state_dict({**cb.state_dict(), "version": 1})


def test_masks_follow_names_when_parameters_are_recreated():
    model = tiny_model()
    cb = PruningCallback(model, PruningConfig.model_validate(
        {"schedule": {"kind": "one_shot", "begin_pruning_step": 0, "final_sparsity": 0.5}}))
    cb.on_step_begin(0)
    name = cb.names[0]
    module = model.get_submodule(name.rsplit(".", 1)[0])
    module.weight = torch.nn.Parameter(torch.randn_like(module.weight))  # a wrapper re-created it
    cb.before_step()
    cb.on_step_end(0)
    assert (model.get_parameter(name)[~cb.masks[name]] == 0).all()


def test_report_json_and_png(tmp_path):
    model = tiny_model()
    cfg = PruningConfig.model_validate({"mask": {"kind": "block", "block_shape": [1, 4]},
                                        "schedule": {"kind": "one_shot", "final_sparsity": 0.75}})
    cb = PruningCallback(model, cfg)
    cb.on_step_begin(0)
    report = sparsity_report(prunable_weights(model, cfg), cfg.mask)
    assert report["global_sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert report["pattern_valid"] is True and len(report["layers"]) == 12  # MLM model: no pooler
    json_path, png_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["layers"][0]["sparsity"] == pytest.approx(0.75, abs=1e-2)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dense = sparsity_report(prunable_weights(tiny_model(), cfg), cfg.mask)
    assert dense["global_sparsity"] == 0.0
