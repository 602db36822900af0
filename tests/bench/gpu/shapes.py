"""The benchmark's shapes, models and batches, made by pofa's own builder and collator."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedModel

from pipelines.models.build import build_pretraining_model
from pipelines.models.config import BertInit, ModelConfig
from tests.bench.bench_kd import collated_batch

PAD_ID = 0  # bert-base-uncased's, as the collator batches of bench_kd use


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int  # > 1000: the collator's fake text draws ids from [1000, vocab)
    seq: int
    batch: int

    def model_config(self) -> ModelConfig:
        return ModelConfig(init=BertInit(hidden_size=self.hidden, num_hidden_layers=self.layers,
                                         num_attention_heads=self.heads, intermediate_size=self.intermediate,
                                         max_position_embeddings=max(512, self.seq)))

    @property
    def tokens(self) -> int:
        """Token positions per step (padding included: the model computes them)."""
        return self.batch * self.seq

    def with_batch(self, batch: int | None, seq: int | None) -> "Shape":
        return replace(self, batch=batch or self.batch, seq=seq or self.seq)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# BERT-Base uncased at BERT's phase-1 length; 256 sequences per device is the reference's batch
BERT_BASE = Shape("bert-base", hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522, seq=128, batch=256)
# The CPU test tier: every code path in seconds
TINY = Shape("tiny", hidden=64, layers=2, heads=2, intermediate=128, vocab=1200, seq=32, batch=8)


def build_model(shape: Shape, seed: int) -> PreTrainedModel:
    """BertForPreTraining (MLM + NSP heads) from pofa's builder, seeded random weights."""
    return build_pretraining_model(shape.model_config(), vocab_size=shape.vocab, pad_token_id=PAD_ID, seed=seed)


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] A [SEP] B [SEP] rows through pofa's collator (dynamic masking, some padding)."""
    batch = collated_batch(shape.batch, shape.seq, shape.vocab, seed=seed)
    return {k: v.to(device) for k, v in batch.items()}
