"""TrainConfig validation, the LR schedule, and the model config / builder."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipelines.models.build import build_pretraining_model, load_pretraining_model, resolve_model_config
from pipelines.models.config import BertInit, ModelConfig
from pipelines.sparsity.config import PruningConfig, ScheduleConfig
from pipelines.training.config import TrainConfig
from pipelines.training.schedule import linear_lr, make_lr_fn, warmup_steps


def test_gradient_accumulation_is_derived_from_the_global_batch():
    cfg = TrainConfig(num_workers=2, global_batch_size=256, micro_batch_size=32)
    assert cfg.grad_accum_steps == 4
    assert cfg.samples_per_rank_per_step == 128
    # the same global batch on 8 workers accumulates less
    assert TrainConfig(num_workers=8, global_batch_size=256, micro_batch_size=32).grad_accum_steps == 1


def test_indivisible_batch_names_the_keys():
    with pytest.raises(ValueError) as err:
        TrainConfig(num_workers=3, global_batch_size=256, micro_batch_size=32)
    text = str(err.value)
    assert "global_batch_size=256" in text and "num_workers=3" in text and "micro_batch_size=32" in text


def test_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="zero_stage"):
        TrainConfig(zero_stage=4)
    with pytest.raises(ValidationError, match="fp16"):
        TrainConfig(precision="fp16", gpus_per_worker=0)
    with pytest.raises(ValidationError, match="placement_strategy"):
        TrainConfig(placement_strategy="ANYWHERE")
    with pytest.raises(ValidationError, match="extra"):
        TrainConfig(learning_rat=1e-4)


def test_seed_defaults_to_the_run_seed():
    assert TrainConfig().resolved_seed(7) == 7
    assert TrainConfig(seed=3).resolved_seed(7) == 3


def test_linear_schedule_warms_up_then_decays_to_zero():
    kw = dict(base_lr=1e-3, total_steps=100, warmup_ratio=0.1)
    assert warmup_steps(100, 0.1) == 10
    assert linear_lr(0, **kw) == 0.0
    assert linear_lr(5, **kw) == pytest.approx(5e-4)
    assert linear_lr(10, **kw) == pytest.approx(1e-3)
    assert linear_lr(55, **kw) == pytest.approx(5e-4)
    assert linear_lr(100, **kw) == 0.0
    assert linear_lr(150, **kw) == 0.0


def test_lr_rewinding_comes_from_the_pruning_recipe():
    cfg = TrainConfig(max_steps=100, warmup_ratio=0.0, learning_rate=1.0)
    schedule = ScheduleConfig(policy_begin_step=0, policy_end_step=40, begin_pruning_step=0,
                              end_pruning_step=60, pruning_frequency=10)
    plain = make_lr_fn(cfg, None)
    no_rewind = make_lr_fn(cfg, PruningConfig(schedule=schedule, lr_rewind=False))
    rewind = make_lr_fn(cfg, PruningConfig(schedule=schedule, lr_rewind=True))
    assert [no_rewind(s) for s in (0, 30, 70)] == [plain(s) for s in (0, 30, 70)]
    # after the policy window the rewound schedule restarts higher than the plain decay
    assert rewind(41) > plain(41)
    assert rewind(99) > 0 and rewind(100) == pytest.approx(0.0)


def test_model_config_name_and_init_are_exclusive():
    assert ModelConfig().init == BertInit()
    with pytest.raises(ValidationError, match="exclusive"):
        ModelConfig(name="bert-base-uncased", init=BertInit())
    with pytest.raises(ValidationError, match="num_attention_heads"):
        BertInit(hidden_size=64, num_attention_heads=3)


def test_from_scratch_model_is_seeded_and_sized_by_the_tokenizer():
    cfg = ModelConfig(init=BertInit(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    a = build_pretraining_model(cfg, vocab_size=120, seed=5)
    b = build_pretraining_model(cfg, vocab_size=120, seed=5)
    c = build_pretraining_model(cfg, vocab_size=120, seed=6)
    assert a.config.vocab_size == 120 and a.config.hidden_size == 32
    emb = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(a.state_dict()[emb], b.state_dict()[emb])
    assert not torch.equal(a.state_dict()[emb], c.state_dict()[emb])
    out = a(input_ids=torch.tensor([[2, 7, 3]]))
    assert out.prediction_logits.shape == (1, 3, 120) and out.seq_relationship_logits.shape == (1, 2)


def test_unknown_model_names_the_key(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="model.name="):
        resolve_model_config(ModelConfig(name=missing), vocab_size=100)
    with pytest.raises(ValueError, match="cannot load"):
        load_pretraining_model(missing)


def test_a_model_folder_that_is_not_bert_is_refused_before_training(tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)
    with pytest.raises(ValueError, match="is a 'gpt2' checkpoint, not one of \\['bert', 'distilbert'\\]"):
        resolve_model_config(ModelConfig(name=str(folder)), vocab_size=100)


def test_a_model_smaller_than_the_tokenizer_is_refused(tmp_path):
    model = build_pretraining_model(ModelConfig(), vocab_size=50, seed=0)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="vocab_size=50"):
        resolve_model_config(ModelConfig(name=str(tmp_path / "m")), vocab_size=100)
