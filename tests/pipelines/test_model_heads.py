"""DistilBERT (MLM only, no segment ids) trains through the same pretraining and distillation code as BERT."""
import torch
from transformers import AutoModelForPreTraining, BertConfig, DistilBertConfig

from pipelines.distillation import DistillationConfig, distillation_loss
from pipelines.models.heads import accepted_inputs, nsp_logits
from pipelines.training.losses import metrics_from_counts, pretraining_counts, pretraining_loss

INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def _batch(vocab: int = 50) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids),
            "labels": labels, "next_sentence_label": torch.tensor([0, 1, 0])}


def _models():
    distil = AutoModelForPreTraining.from_config(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2,
                                                                  hidden_dim=64, max_position_embeddings=32))
    bert = AutoModelForPreTraining.from_config(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64,
                                                          max_position_embeddings=32))
    return distil, bert


def test_distilbert_gets_mlm_only_loss_and_no_segment_ids() -> None:
    distil, bert = _models()
    batch = _batch()
    assert "token_type_ids" not in accepted_inputs(distil, batch, INPUTS)
    assert "token_type_ids" in accepted_inputs(bert, batch, INPUTS)
    out = distil(**accepted_inputs(distil, batch, INPUTS))
    assert nsp_logits(out) is None
    total, mlm, nsp = pretraining_loss(out, batch)
    assert torch.equal(total, mlm) and nsp.item() == 0.0 and mlm.item() > 0
    total.backward()  # the MLM loss reaches the encoder
    assert distil.distilbert.transformer.layer[0].ffn.lin1.weight.grad.abs().sum() > 0
    metrics = metrics_from_counts(pretraining_counts(out, batch))
    assert metrics["val/nsp_loss"] == 0.0 and metrics["val/mlm_loss"] > 0


def test_distilbert_distillation_uses_mlm_terms() -> None:
    distil, _ = _models()
    distil.eval()  # no dropout: the same model twice gives the same logits
    batch = _batch()
    inputs = accepted_inputs(distil, batch, INPUTS)
    student, teacher = distil(**inputs), distil(**inputs)
    same = distillation_loss("pretraining", student, teacher, batch, DistillationConfig())
    assert abs(same.kd.item()) < 1e-6  # identical logits: no KL
    assert torch.isclose(same.total, 0.5 * same.hard)
