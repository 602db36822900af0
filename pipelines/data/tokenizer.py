"""The model's tokenizer: loaded by hub name or local path, or WordPiece trained on the corpus (offline demo)."""
from __future__ import annotations

import os
from typing import Iterable

from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"preprocess.tokenizer.name: cannot load tokenizer {name_or_path!r}: {exc}") from exc
    if not tok.is_fast:
        raise ValueError(f"preprocess.tokenizer.name: {name_or_path!r} has no fast tokenizer")
    missing = [t for t in ("cls_token", "sep_token", "mask_token", "pad_token") if getattr(tok, t) is None]
    if missing:
        raise ValueError(f"preprocess.tokenizer.name: {name_or_path!r} lacks {', '.join(missing)} needed for MLM+NSP")
    return tok


def build_wordpiece_vocab(texts: Iterable[str], vocab_size: int, lowercase: bool) -> list[str]:
    """A WordPiece vocabulary learned from word counts, deterministically.

    The `tokenizers` trainers break frequency ties by hash-map order, which Rust seeds per process: the
    same corpus gives a different vocabulary on every run, and with it different shards. Here every
    choice is ordered by (score, string): whole words and word-initial/continuation pieces are scored by
    how many characters they cover (count x length), on top of every character seen.
    """
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer = BertNormalizer(lowercase=lowercase, strip_accents=lowercase, clean_text=True,
                                handle_chinese_chars=True)
    pre = BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({c for w in words for c in w})
    base = SPECIAL_TOKENS + alphabet + [f"##{c}" for c in alphabet]
    scores: Counter = Counter()
    for word, count in words.items():
        if count < 2:
            continue
        for i in range(2, min(len(word), 16) + 1):
            scores[word[:i]] += count * i  # word-initial pieces, the whole word included
        for i in range(1, len(word) - 1):
            if len(word) - i <= 16:
                scores["##" + word[i:]] += count * (len(word) - i)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    room = max(0, vocab_size - len(base))
    return base + [piece for piece, _ in ranked[:room]]


def train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool, out_dir: str,
                    model_max_length: int) -> PreTrainedTokenizerFast:
    """Learn a WordPiece vocabulary from `texts` and save a BERT tokenizer folder (AutoTokenizer-loadable)."""
    os.makedirs(out_dir, exist_ok=True)
    vocab = build_wordpiece_vocab(texts, vocab_size, lowercase)
    tok = BertTokenizerFast(vocab={piece: i for i, piece in enumerate(vocab)}, do_lower_case=lowercase,
                            strip_accents=lowercase, model_max_length=model_max_length)
    tok.save_pretrained(out_dir)
    return tok
