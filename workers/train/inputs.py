"""Reading the preprocess stage's outputs: tokenizer, manifest, collator settings."""
from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipelines.data.collator import CollatorSettings


def read_manifest(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f"preprocess manifest {path!r} is missing: run the preprocess stage first")
    with open(path) as f:
        return json.load(f)


def saved_vocab(folder: str) -> Any:
    """The WordPiece vocabulary in a saved fast tokenizer's `tokenizer.json`, or None (absent/other kind):
    cheap enough to compare two folders before any worker starts."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        vocab = json.load(f).get("model", {}).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def load_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerBase:
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"tokenizer folder {tokenizer_dir!r} is missing: run the preprocess stage first")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def collator_settings(tokenizer: PreTrainedTokenizerBase, manifest: dict[str, Any]) -> CollatorSettings:
    cfg = manifest.get("config", {})
    for token in ("pad_token_id", "mask_token_id"):
        if getattr(tokenizer, token) is None:
            raise ValueError(f"tokenizer has no {token.replace('_id', '')}: MLM pretraining needs one")
    return CollatorSettings(
        pad_id=tokenizer.pad_token_id, mask_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
        special_ids=frozenset(tokenizer.all_special_ids), masking=cfg.get("masking", "dynamic"),
        masked_lm_prob=float(cfg.get("masked_lm_prob", 0.15)),
        max_predictions_per_seq=int(cfg.get("max_predictions_per_seq", 20)))
