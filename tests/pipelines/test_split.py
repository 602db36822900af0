"""The 95/5 split is decided by document identity and seed: not by order, shard count or worker count."""
import random

from pipelines.data.split import is_validation, validation_score


def test_fraction_and_stability_under_reordering():
    ids = [f"doc-{i}" for i in range(20000)]
    val = {d for d in ids if is_validation(d, 42, 0.05)}
    assert 0.045 < len(val) / len(ids) < 0.055
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert {d for d in shuffled if is_validation(d, 42, 0.05)} == val
    # Any sharding of the same documents gives the same split.
    shards = [shuffled[i::7] for i in range(7)]
    assert set().union(*({d for d in s if is_validation(d, 42, 0.05)} for s in shards)) == val


def test_seed_changes_the_split_and_scores_are_uniform():
    ids = [str(i) for i in range(5000)]
    assert {d for d in ids if is_validation(d, 1, 0.1)} != {d for d in ids if is_validation(d, 2, 0.1)}
    scores = [validation_score(d, 7) for d in ids]
    assert all(0 <= s < 1 for s in scores)
    assert abs(sum(scores) / len(scores) - 0.5) < 0.02


def test_odd_unicode_identities_do_not_crash():
    for doc_id in ["Ελληνικά", "日本語", "\udcff-lone-surrogate", "", "a" * 10000]:
        assert isinstance(is_validation(doc_id, 0, 0.5), bool)
