"""Sentence-pair instances as statistics over many documents (Devlin et al.'s recipe)."""
import random

import pytest

from pipelines.data.instances import PairSettings, create_instances, pack

CLS, SEP = 2, 3


def _corpus(rng: random.Random, n_docs: int = 300) -> list[list[list[int]]]:
    return [[[rng.randrange(10, 1000) for _ in range(rng.randint(5, 30))] for _ in range(rng.randint(1, 40))]
            for _ in range(n_docs)]


@pytest.fixture(scope="module")
def instances():
    docs = _corpus(random.Random(0))
    return list(create_instances(docs, PairSettings(max_seq_length=128), random.Random(1)))


def test_lengths_never_exceed_max_and_segments_are_nonempty(instances):
    assert len(instances) > 1000
    for inst in instances:
        assert inst.tokens_a and inst.tokens_b
        assert len(inst.tokens_a) + len(inst.tokens_b) <= 128 - 3


def test_short_target_fraction_matches_short_seq_prob(instances):
    short = sum(i.short_target for i in instances) / len(instances)
    assert 0.07 < short < 0.13
    # Short targets make short instances: their mean length is well below the full-length ones.
    mean = lambda xs: sum(len(i.tokens_a) + len(i.tokens_b) for i in xs) / len(xs)  # noqa: E731
    assert mean([i for i in instances if i.short_target]) < 0.75 * mean([i for i in instances if not i.short_target])


def test_nsp_random_fraction_is_half_plus_single_sentence_chunks(instances):
    frac = sum(i.is_random_next for i in instances) / len(instances)
    # 0.5 by coin, plus chunks of one sentence, which always take a random B (the reference's rule).
    assert 0.48 < frac < 0.65


def test_special_token_layout_and_segment_ids(instances):
    for inst in instances[:200]:
        ids, types = pack(inst, CLS, SEP)
        a, b = len(inst.tokens_a), len(inst.tokens_b)
        assert ids[0] == CLS and ids[a + 1] == SEP and ids[-1] == SEP
        assert len(ids) == a + b + 3 == len(types)
        assert types == [0] * (a + 2) + [1] * (b + 1)
        assert CLS not in ids[1:] and ids.count(SEP) == 2


def test_actual_next_segments_are_contiguous_in_the_document():
    rng = random.Random(3)
    # Each sentence is a unique token range so contiguity can be read off the ids.
    docs, nxt = [], 10
    for _ in range(50):
        doc = []
        for _ in range(rng.randint(2, 12)):
            n = rng.randint(3, 12)
            doc.append(list(range(nxt, nxt + n)))
            nxt += n
        docs.append(doc)
    insts = list(create_instances(docs, PairSettings(max_seq_length=512, short_seq_prob=0.0), random.Random(4)))
    real = [i for i in insts if not i.is_random_next]
    assert real
    for inst in real:
        assert inst.tokens_b[0] == inst.tokens_a[-1] + 1  # B starts right where A ends


def test_same_seed_same_instances():
    docs = _corpus(random.Random(5), 40)
    a = list(create_instances(docs, PairSettings(64), random.Random(9)))
    b = list(create_instances(docs, PairSettings(64), random.Random(9)))
    assert a == b


def test_single_document_pool_never_pairs_with_itself():
    doc = [[11, 12, 13], [14, 15, 16], [17, 18]]
    insts = list(create_instances([doc], PairSettings(16, nsp_random_prob=1.0), random.Random(0)))
    assert insts and not any(i.is_random_next for i in insts)
