"""Small real transformers BERTs for the inference tests, pruned with the project's own GMP code."""
from __future__ import annotations

import os

import torch
from transformers import BertConfig, BertForPreTraining, BertForSequenceClassification

from pipelines.sparsity import PruningConfig, TorchMaskEnforcer, compute_masks, prunable_weights, sparsity_report
from pipelines.sparsity import write_report

SEQ = 32


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def pruned(model: torch.nn.Module, sparsity: float = 0.9) -> torch.nn.Module:
    """Magnitude masks at `sparsity` over the default prunable layers, applied as training does."""
    cfg = PruningConfig()
    weights = prunable_weights(model, cfg)
    TorchMaskEnforcer(model).set_masks(compute_masks(weights, sparsity, cfg))
    return model


def pretraining_model(seed: int, sparsity: float = 0.0) -> BertForPreTraining:
    torch.manual_seed(seed)
    model = BertForPreTraining(bert_config()).eval()
    return pruned(model, sparsity) if sparsity else model


def classifier(seed: int, sparsity: float = 0.0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    model = BertForSequenceClassification(bert_config()).eval()
    return pruned(model, sparsity) if sparsity else model


def export(model: torch.nn.Module, folder: str) -> str:
    """A Hugging Face folder as the training stages write it (safetensors, config, sparsity.json)."""
    model.save_pretrained(folder)
    report = sparsity_report(prunable_weights(model, PruningConfig()))
    write_report(report, folder)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    return folder
