"""One shard of documents -> cleaned, split, tokenized sentence-pair instances and their statistics.

A shard is a fixed run of consecutive documents from one read unit. All randomness is seeded from the
recipe seed and the shard id, and random partners for segment B come from the same shard and split, so
a shard's output is the same whichever worker makes it and however many workers there are.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa

from pipelines.data.config import PreprocessConfig
from pipelines.data.documents import RawDocument, SkipCounter
from pipelines.data.instances import PairSettings, instances_from_document, pack
from pipelines.data.masking import MaskSettings, mask_instance
from pipelines.data.sentences import split_lines, split_sentences
from pipelines.data.split import is_validation
from pipelines.data.wikitext import clean_page

SPLITS = ("train", "validation")

SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("token_type_ids", pa.list_(pa.int8())),
    ("next_sentence_label", pa.int8()),  # 0: B follows A in the document, 1: B is from a random document
    ("masked_lm_positions", pa.list_(pa.int32())),  # static masking only, else empty
    ("masked_lm_ids", pa.list_(pa.int32())),
])


@dataclass
class ShardStats:
    documents: Counter = field(default_factory=Counter)  # split -> documents that made instances
    instances: Counter = field(default_factory=Counter)  # split -> instances
    skipped: SkipCounter = field(default_factory=SkipCounter)
    sentences: int = 0
    tokens: int = 0  # token ids written, special tokens included
    short_instances: int = 0
    random_next: int = 0
    masked_tokens: int = 0
    maskable_tokens: int = 0
    length_histogram: Counter = field(default_factory=Counter)  # instance length bucket (of 16) -> count

    def as_dict(self) -> dict[str, Any]:
        return {"documents": dict(self.documents), "instances": dict(self.instances), "skipped": dict(self.skipped),
                "sentences": self.sentences, "tokens": self.tokens, "short_instances": self.short_instances,
                "random_next": self.random_next, "masked_tokens": self.masked_tokens,
                "maskable_tokens": self.maskable_tokens,
                "length_histogram": {str(k): v for k, v in sorted(self.length_histogram.items())}}


def shard_rng(seed: int, shard_id: str, split: str, copy: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}/{shard_id}/{split}/{copy}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def clean_document(doc: RawDocument, skipped: SkipCounter) -> str | None:
    """Visible text of a document, or None (and the reason counted) when it has none worth keeping."""
    text = doc.text
    if doc.markup == "wikitext":
        try:
            disambiguation, text = clean_page(text)
        except Exception:  # noqa: BLE001 - the parser's errors are not typed; count the document
            skipped.skip("unparseable")
            return None
        if disambiguation:
            skipped.skip("disambiguation")
            return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. from surrogateescape): the tokenizer cannot take them
        skipped.skip("undecodable")
        return None
    text = text.replace("\x00", "").strip()  # the ends only: a "lines" document's sentences are its lines
    if not text:
        skipped.skip("empty")
        return None
    return text


def _sentences(doc: RawDocument, text: str, language: str) -> list[str]:
    # A sentence-per-line source already says where sentences end: the segmenter would merge and re-cut them.
    return split_lines(text) if doc.markup == "lines" else split_sentences(text, language)


def encode_sentences(tokenizer, sentences: list[str]) -> list[list[int]]:
    """Token ids of each sentence, no special tokens: the fast tokenizer's own Rust encoder called directly
    (`encode_batch_fast`: no offsets, no per-encoding conversion to Python dicts), the same ids as
    `tokenizer(sentences, add_special_tokens=False)["input_ids"]`. A backend that has truncation or padding
    configured goes through the `transformers` call, which turns them off for an unpadded call."""
    if not sentences:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(sentences, add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(sentences, add_special_tokens=False)]


def process_shard(docs: Sequence[RawDocument], shard_id: str, cfg: PreprocessConfig, seed: int,
                  tokenizer) -> tuple[dict[str, pa.Table], ShardStats]:
    stats = ShardStats()
    texts, ids = [], []
    for doc in docs:
        text = clean_document(doc, stats.skipped)
        if text is not None:
            texts.append(_sentences(doc, text, cfg.language))
            ids.append(doc.doc_id)
    flat = [s for sentences in texts for s in sentences]
    encoded = encode_sentences(tokenizer, flat)
    pools: dict[str, list[list[list[int]]]] = {split: [] for split in SPLITS}
    cursor = 0
    for doc_id, sentences in zip(ids, texts):
        tokenized = [t for t in encoded[cursor:cursor + len(sentences)] if t]
        cursor += len(sentences)
        if sum(map(len, tokenized)) < cfg.min_document_tokens:
            stats.skipped.skip("too_short")
            continue
        stats.sentences += len(tokenized)
        split = "validation" if is_validation(doc_id, seed, cfg.validation_fraction) else "train"
        pools[split].append(tokenized)
    tables = {split: _instances_table(pools[split], shard_id, split, cfg, seed, tokenizer, stats) for split in SPLITS}
    return tables, stats


def _instances_table(pool: list[list[list[int]]], shard_id: str, split: str, cfg: PreprocessConfig, seed: int,
                     tokenizer, stats: ShardStats) -> pa.Table:
    settings = PairSettings(cfg.max_seq_length, cfg.short_seq_prob, cfg.nsp_random_prob)
    static = cfg.masking == "static"
    # Token ids looked up once: each `tokenizer.*_id` property is a vocabulary lookup through `transformers`.
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    special = frozenset(tokenizer.all_special_ids) if static else frozenset()
    mask_settings = MaskSettings(cfg.masked_lm_prob, cfg.max_predictions_per_seq, len(tokenizer),
                                 tokenizer.mask_token_id) if static else None
    input_ids: list[list[int]] = []
    type_ids: list[list[int]] = []
    nsp: list[int] = []
    positions_col: list[list[int]] = []
    labels_col: list[list[int]] = []
    histogram = stats.length_histogram
    productive = [False] * len(pool)
    tokens = short = 0
    for copy in range(cfg.dupe_factor):
        rng = shard_rng(seed, shard_id, split, copy)
        for index in range(len(pool)):
            for inst in instances_from_document(pool, index, settings, rng):
                productive[index] = True
                ids, types = pack(inst, cls_id, sep_id)
                if static:
                    ids, positions, labels = mask_instance(ids, special, mask_settings, rng)
                    stats.masked_tokens += len(positions)
                    stats.maskable_tokens += len(ids) - 3
                    positions_col.append(positions)
                    labels_col.append(labels)
                input_ids.append(ids)
                type_ids.append(types)
                nsp.append(int(inst.is_random_next))
                n = len(ids)
                tokens += n
                short += inst.short_target
                histogram[(n - 1) // 16 * 16] += 1
    random_next = sum(nsp)  # 0 or 1 each
    stats.tokens += tokens
    stats.short_instances += short
    stats.random_next += random_next
    made = sum(productive)
    stats.documents[split] += made
    if made < len(pool):
        stats.skipped.skip("made_no_instance", len(pool) - made)
    stats.instances[split] += len(input_ids)
    if not static:  # no stored masks: every row's lists are empty
        positions_col = labels_col = [[]] * len(input_ids)
    return pa.table({"input_ids": input_ids, "token_type_ids": type_ids,
                     "next_sentence_label": pa.array(nsp, type=pa.int8()),
                     "masked_lm_positions": positions_col, "masked_lm_ids": labels_col}, schema=SCHEMA)
