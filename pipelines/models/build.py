"""Build BERT-style pretraining models (MLM + NSP heads) through the Auto classes."""
from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForPreTraining, BertConfig, PretrainedConfig, PreTrainedModel

from pipelines.models.config import ModelConfig

MODEL_TYPES = frozenset({"bert", "distilbert"})  # the encoders of Intel's Prune OFA model cards


def resolve_model_config(cfg: ModelConfig, *, vocab_size: int, pad_token_id: int | None = None) -> PretrainedConfig:
    """The architecture config, without loading weights; errors name the key (called before any worker starts)."""
    if cfg.name is None:
        init = cfg.init
        assert init is not None  # ModelConfig fills a default
        return BertConfig(vocab_size=vocab_size, hidden_size=init.hidden_size,
                          num_hidden_layers=init.num_hidden_layers, num_attention_heads=init.num_attention_heads,
                          intermediate_size=init.intermediate_size,
                          max_position_embeddings=init.max_position_embeddings,
                          pad_token_id=0 if pad_token_id is None else pad_token_id)
    try:
        config = AutoConfig.from_pretrained(cfg.name)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.name={cfg.name!r}: not a local model folder nor a reachable hub model ({exc})") from exc
    if config.model_type not in MODEL_TYPES:
        raise ValueError(f"model.name={cfg.name!r} is a {config.model_type!r} checkpoint, not one of "
                         f"{sorted(MODEL_TYPES)}: Prune OFA's recipes (and pofa's pruning patterns and heads) are "
                         "for BERT and DistilBERT encoders")
    if config.vocab_size < vocab_size:
        raise ValueError(f"model.name={cfg.name!r} has vocab_size={config.vocab_size} but the tokenizer has "
                         f"{vocab_size} tokens: preprocess with the model's own tokenizer")
    return config


def build_pretraining_model(cfg: ModelConfig, *, vocab_size: int, pad_token_id: int | None = None,
                            seed: int = 0) -> PreTrainedModel:
    """A model with MLM + NSP heads: pretrained weights for `name`, or a seeded random init for `init`."""
    if cfg.name is None:
        config = resolve_model_config(cfg, vocab_size=vocab_size, pad_token_id=pad_token_id)
        # Same seed on every rank: identical initial weights without relying on a broadcast.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForPreTraining.from_config(config)
    return load_pretraining_model(cfg.name)


def load_pretraining_model(name_or_path: str) -> PreTrainedModel:
    """Load a pretraining model (e.g. the teacher export the student starts from)."""
    try:
        return AutoModelForPreTraining.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        where = "local folder" if os.path.isdir(name_or_path) else "hub model"
        raise ValueError(f"model {name_or_path!r}: cannot load as a {where} with MLM+NSP heads ({exc})") from exc
