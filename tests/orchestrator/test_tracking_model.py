"""An exported Hugging Face folder logged as an MLflow transformers model and loaded back."""
from __future__ import annotations

import mlflow
import torch
from mlflow import MlflowClient
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from orchestrator.tracking import TrackingConfig, TrackingSession

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "##s"]


def tiny_export(folder) -> BertForMaskedLM:
    """A tiny BERT MLM and WordPiece tokenizer, built offline and saved like pofa's export."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                  cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=64)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_exported_model_logs_registers_and_loads_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    original = tiny_export(run_dir / "student" / "export")
    session = TrackingSession.open(TrackingConfig(), run_dir)
    run_id = session.start_stage("student")

    uri = session.log_model(run_dir / "student" / "export", key="student", name="student",
                            registered_model_name="pofa-tiny-student")
    session.end_stage("student")
    session.finish()

    assert uri.startswith("models:/")
    # A reader points MLflow at the run's store, as `mlflow ui` / serving would.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", session.uri)
    pipe = mlflow.transformers.load_model(uri)
    assert pipe.task == "fill-mask"
    predictions = pipe("the cat [MASK] on the mat")
    assert predictions and all(p["token_str"] for p in predictions)
    # The loaded weights are the exported ones.
    loaded = pipe.model.state_dict()
    for name, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor)

    client = MlflowClient(session.uri)
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.source_run_id == run_id
    assert logged.experiment_id == session.experiment_id
    assert logged.artifact_location.startswith((run_dir / "mlartifacts").resolve().as_uri())
    versions = client.search_model_versions("name='pofa-tiny-student'")
    assert [str(v.version) for v in versions] == ["1"]
    registered = mlflow.transformers.load_model("models:/pofa-tiny-student/1")
    torch.testing.assert_close(registered.model.state_dict()["cls.predictions.bias"],
                               original.state_dict()["cls.predictions.bias"])
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
