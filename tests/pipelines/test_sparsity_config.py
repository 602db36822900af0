"""Bad input is refused before training, with errors naming the recipe key."""
import pytest
from transformers import (BertConfig, BertForPreTraining, BertForQuestionAnswering, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForMaskedLM)

from pipelines.sparsity import PruningConfig, select_parameters, validate_against_model


def tiny_bert(cls=BertForPreTraining):
    return cls(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=32))


@pytest.mark.parametrize("patch, key", [
    ({"schedule": {"final_sparsity": 1.0}}, "pruning.schedule.final_sparsity"),
    ({"schedule": {"final_sparsity": -0.1}}, "pruning.schedule.final_sparsity"),
    ({"schedule": {"initial_sparsity": 1.5, "final_sparsity": 0.5}}, "pruning.schedule.initial_sparsity"),
    ({"schedule": {"begin_pruning_step": 100, "end_pruning_step": 50}}, "pruning.schedule.end_pruning_step"),
    ({"schedule": {"policy_begin_step": 10, "policy_end_step": 10}}, "pruning.schedule.policy_end_step"),
    ({"mask": {"block_shape": [0, 4]}}, "pruning.mask.block_shape"),
    ({"mask": {"kind": "nm", "n": 4, "m": 4}}, "pruning.mask.n"),
    ({"mask": {"kind": "nm"}, "allocation": "erk"}, "pruning.allocation"),
    ({"include": []}, "pruning.include"),
    ({"exclude": ["("]}, "pruning.exclude[0]"),
])
def test_config_errors_name_the_key(patch, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        PruningConfig.model_validate(patch)


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="sparsty"):
        PruningConfig.model_validate({"schedule": {"final_sparsty": 0.9}})


def test_end_minus_one_is_valid():
    assert PruningConfig.model_validate({"schedule": {"end_pruning_step": -1}}).schedule.end_pruning_step == -1


def test_model_checks_name_the_key():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"pruning\.include"):
        validate_against_model(PruningConfig(include=["nothing_matches"]), model)
    with pytest.raises(ValueError, match=r"pruning\.mask\.block_shape=\[1, 5\]"):
        validate_against_model(PruningConfig.model_validate({"mask": {"kind": "block", "block_shape": [1, 5]}}), model)
    with pytest.raises(ValueError, match=r"pruning\.mask\.m=3"):
        validate_against_model(PruningConfig.model_validate({"mask": {"kind": "nm", "n": 1, "m": 3}}), model)
    ok = validate_against_model(PruningConfig.model_validate({"mask": {"kind": "block", "block_shape": [1, 4]}}), model)
    assert len(ok) == 13


def _check_default(names, all_names):
    assert names, "nothing selected"
    assert all(n.endswith(".weight") for n in names)
    for bad in ("embeddings", "LayerNorm", "layer_norm", "cls.", "classifier", "qa_outputs", "lm_head"):
        assert not any(bad in n for n in names), bad
    # every encoder linear weight is selected
    assert len(names) == 12 or len(names) == 13


def test_default_selection_across_architectures():
    bert = tiny_bert()
    names = select_parameters(bert, PruningConfig())
    _check_default(names, [n for n, _ in bert.named_parameters()])
    assert "bert.pooler.dense.weight" in names and len(names) == 13
    qa = tiny_bert(BertForQuestionAnswering)
    assert not any("qa_outputs" in n for n in select_parameters(qa, PruningConfig()))
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2,
                                                                  hidden_dim=64, max_position_embeddings=32))
    dn = select_parameters(distil, PruningConfig())
    _check_default(dn, None)
    assert "distilbert.transformer.layer.0.ffn.lin1.weight" in dn and len(dn) == 12
    roberta = RobertaForMaskedLM(RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64,
                                               max_position_embeddings=40))
    rn = select_parameters(roberta, PruningConfig())
    _check_default(rn, None)
    assert len(rn) == 12
