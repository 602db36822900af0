"""Static masking: 15% of non-special tokens, 80% [MASK] / 10% random / 10% unchanged."""
import random

from pipelines.data.masking import MaskSettings, mask_instance

MASK = 4
SPECIAL = frozenset({0, 1, 2, 3, 4})


def test_80_10_10_and_counts_over_many_instances():
    rng = random.Random(0)
    settings = MaskSettings(0.15, 20, vocab_size=5000, mask_id=MASK)
    n_mask = n_random = n_keep = total = 0
    for _ in range(3000):
        body = [rng.randrange(100, 5000) for _ in range(rng.randint(20, 120))]
        ids = [2, *body, 3]
        masked, positions, labels = mask_instance(ids, SPECIAL, settings, rng)
        assert positions == sorted(set(positions))
        assert len(positions) == min(20, max(1, round(len(ids) * 0.15)))
        assert all(ids[p] not in SPECIAL for p in positions)
        assert labels == [ids[p] for p in positions]
        unmasked = set(range(len(ids))) - set(positions)
        assert all(masked[i] == ids[i] for i in unmasked)
        for p in positions:
            total += 1
            if masked[p] == MASK:
                n_mask += 1
            elif masked[p] == ids[p]:
                n_keep += 1
            else:
                n_random += 1
    assert abs(n_mask / total - 0.8) < 0.02
    assert abs(n_random / total - 0.1) < 0.015
    assert abs(n_keep / total - 0.1) < 0.015


def test_max_predictions_caps_long_sequences():
    ids = [2] + list(range(100, 600)) + [3]
    _, positions, _ = mask_instance(ids, SPECIAL, MaskSettings(0.15, 7, 1000, MASK), random.Random(1))
    assert len(positions) == 7
