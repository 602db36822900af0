"""The model's tokenizer: loaded by hub name or local path, or WordPiece trained on the corpus (offline demo)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # `transformers` imports torch (seconds): only the functions that need it import it
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class EncoderSpec:
    """What preprocessing needs of a tokenizer, portable to a worker that never imports `transformers`:
    the Rust tokenizer exactly as the loaded `transformers` tokenizer holds it, and its special ids."""

    backend_json: str
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int
    all_special_ids: tuple[int, ...]
    vocab_size: int  # len(tokenizer): the vocabulary with added tokens

    @classmethod
    def of(cls, tok: "PreTrainedTokenizerFast") -> "EncoderSpec":
        return cls(tok.backend_tokenizer.to_str(), tok.cls_token_id, tok.sep_token_id, tok.mask_token_id,
                   tuple(tok.all_special_ids), len(tok))

    def load(self) -> "SentenceEncoder":
        return SentenceEncoder(self)


class SentenceEncoder:
    """The tokenizer as `process_shard` uses it (the same attributes as a `transformers` fast tokenizer),
    without `transformers`: a preprocess worker starts in a fraction of the time, since it never imports
    torch. Truncation and padding are off, as for `tokenizer(texts, add_special_tokens=False)`."""

    def __init__(self, spec: EncoderSpec):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(spec.backend_json)
        self.backend_tokenizer.no_truncation()
        self.backend_tokenizer.no_padding()
        self.cls_token_id = spec.cls_token_id
        self.sep_token_id = spec.sep_token_id
        self.mask_token_id = spec.mask_token_id
        self.all_special_ids = list(spec.all_special_ids)
        self._len = spec.vocab_size

    def __len__(self) -> int:
        return self._len


def load_tokenizer(name_or_path: str) -> "PreTrainedTokenizerFast":
    from transformers import AutoTokenizer

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
                    model_max_length: int) -> "PreTrainedTokenizerFast":
    """Learn a WordPiece vocabulary from `texts` and save a BERT tokenizer folder (AutoTokenizer-loadable)."""
    from transformers import BertTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    vocab = build_wordpiece_vocab(texts, vocab_size, lowercase)
    tok = BertTokenizerFast(vocab={piece: i for i, piece in enumerate(vocab)}, do_lower_case=lowercase,
                            strip_accents=lowercase, model_max_length=model_max_length)
    tok.save_pretrained(out_dir)
    return tok
