"""Sentence-pair instances for MLM + next-sentence prediction (Devlin et al.'s create_pretraining_data).

One deliberate difference from the reference scripts: the short target length is drawn per instance,
not once per document pass, so that `short_seq_prob` is the share of short instances whatever the
document lengths (the reference's share drifts with them; see prune-ofa.md).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

Document = Sequence[Sequence[int]]  # a document is a list of tokenized sentences


@dataclass(frozen=True)
class Instance:
    tokens_a: list[int]
    tokens_b: list[int]
    is_random_next: bool
    short_target: bool


@dataclass(frozen=True)
class PairSettings:
    max_seq_length: int
    short_seq_prob: float = 0.1
    nsp_random_prob: float = 0.5


def create_instances(documents: Sequence[Document], settings: PairSettings, rng: random.Random) -> Iterator[Instance]:
    """All instances of a pool of documents; segment B's random partner comes from the same pool."""
    for index in range(len(documents)):
        yield from instances_from_document(documents, index, settings, rng)


def _draw_target(max_tokens: int, short_seq_prob: float, rng: random.Random) -> tuple[int, bool]:
    if rng.random() < short_seq_prob:
        return rng.randint(2, max_tokens), True
    return max_tokens, False


def instances_from_document(documents: Sequence[Document], index: int, settings: PairSettings,
                             rng: random.Random) -> Iterator[Instance]:
    document = documents[index]
    max_tokens = settings.max_seq_length - 3  # [CLS] A [SEP] B [SEP]
    target, short = _draw_target(max_tokens, settings.short_seq_prob, rng)
    chunk: list[Sequence[int]] = []
    length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        length += len(document[i])
        if i == len(document) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            tokens_b: list[int] = []
            can_draw_random = len(documents) > 1
            if can_draw_random and (len(chunk) == 1 or rng.random() < settings.nsp_random_prob):
                is_random = True
                b_target = target - len(tokens_a)
                other = rng.randrange(len(documents) - 1)
                other += other >= index  # any document but this one
                random_doc = documents[other]
                start = rng.randrange(len(random_doc))
                for sentence in random_doc[start:]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= b_target:
                        break
                i -= len(chunk) - a_end  # the unused sentences go back into the stream
            else:
                is_random = False
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
            if tokens_a and tokens_b:
                _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                yield Instance(tokens_a, tokens_b, is_random, short)
            chunk, length = [], 0
            target, short = _draw_target(max_tokens, settings.short_seq_prob, rng)
        i += 1


def _truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Longest-first truncation, from the front or the back at random (as the reference does).

    The same draws as removing one token at a time, but the lists are cut once at the end: a long
    random segment B loses hundreds of tokens, and deleting from the front one by one is quadratic.
    """
    la, lb = len(tokens_a), len(tokens_b)
    if la + lb <= max_tokens:
        return
    front_a = front_b = 0
    while la + lb > max_tokens:
        front = rng.random() < 0.5
        if la > lb:
            la -= 1
            front_a += front
        else:
            lb -= 1
            front_b += front
    tokens_a[:] = tokens_a[front_a:front_a + la]
    tokens_b[:] = tokens_b[front_b:front_b + lb]


def pack(instance: Instance, cls_id: int, sep_id: int) -> tuple[list[int], list[int]]:
    """input_ids and token_type_ids of `[CLS] A [SEP] B [SEP]`."""
    ids = [cls_id, *instance.tokens_a, sep_id, *instance.tokens_b, sep_id]
    types = [0] * (len(instance.tokens_a) + 2) + [1] * (len(instance.tokens_b) + 1)
    return ids, types
