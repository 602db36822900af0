"""A pretraining export loaded as a task model: the head swap is expected, so it is one informational
line, not transformers' LOAD REPORT warning; encoder weights missing from the checkpoint still warn."""
from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForPreTraining

from pipelines.finetune.tasks import get_task
from workers.finetune.finetune_worker import load_task_model


@pytest.fixture
def export(tmp_path):
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertForPreTraining(config).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_the_head_swap_is_one_line_and_no_warning(export, capsys, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        model = load_task_model(str(export), get_task("sst2"), seed=1)
    out = capsys.readouterr().out
    assert "task head classifier starts fresh; 7 pretraining-head tensor(s) dropped" in out
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert model.classifier.out_features == 2


def test_missing_encoder_weights_still_warn(export) -> None:
    weights = load_file(export / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if "encoder.layer.0.output.dense" not in k}
    save_file(dropped, export / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="encoder tensor\\(s\\) missing"):
        load_task_model(str(export), get_task("sst2"), seed=1)
