"""Exact counts, deterministic ties, block / 2:4 validity, ERK and global allocation."""
import pytest
import torch

from pipelines.sparsity import allocation
from pipelines.sparsity.config import MaskConfig, PruningConfig
from pipelines.sparsity.masks import compute_masks, nm_keep_mask, smallest_k
from pipelines.sparsity.report import block_valid, nm_valid


def _weights(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}.weight": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.85, 0.9, 0.97])
def test_unstructured_exact_counts(sparsity):
    w = _weights([(37, 53), (64, 128)])
    masks = compute_masks(w, sparsity, PruningConfig())
    for name, m in masks.items():
        n = w[name].numel()
        assert int((~m).sum()) == int(sparsity * n)
        # magnitude order: every pruned |w| <= every kept |w|
        if 0 < sparsity:
            assert w[name].abs()[~m].max() <= w[name].abs()[m].min()


def test_counts_truncate_as_the_reference_and_ties_are_deterministic():
    # methods_utils.calc_pruning_threshold: k = int(target_sparsity * n)
    assert allocation.prune_count(10, 0.25) == 2 and allocation.prune_count(10, 0.29) == 2
    assert allocation.prune_count(768 * 768, 0.9) == int(0.9 * 768 * 768) == 530841
    flat = torch.ones(10)
    pruned = smallest_k(flat, 4)
    assert pruned.tolist() == [True] * 4 + [False] * 6  # ties: lowest index first
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 5.0])
    assert smallest_k(scores, 2).tolist() == [False, True, False, True, False, False]


def test_block_masks_are_whole_blocks():
    cfg = PruningConfig(mask=MaskConfig(kind="block", block_shape=(1, 4)))
    w = _weights([(8, 16), (32, 64)])
    masks = compute_masks(w, 0.75, cfg)
    for name, m in masks.items():
        blocks = m.reshape(m.shape[0], -1, 4)
        assert bool((blocks.all(-1) | (~blocks).all(-1)).all())  # each 1x4 block all kept or all pruned
        nblocks = m.numel() // 4
        assert int((~blocks.all(-1)).sum()) == int(0.75 * nblocks + 0.5)
        assert block_valid(w[name] * m, (1, 4))
    cfg2 = PruningConfig(mask=MaskConfig(kind="block", block_shape=(2, 2)))
    m2 = compute_masks(w, 0.5, cfg2)["l0.weight"]
    assert block_valid(m2.float(), (2, 2)) and int((~m2).sum()) == 64
    assert not block_valid(torch.tensor([[0.0, 1.0, 1.0, 1.0]]), (1, 4))


def test_two_four_masks():
    cfg = PruningConfig(mask=MaskConfig(kind="nm", n=2, m=4))
    w = _weights([(16, 32)])
    m = compute_masks(w, 0.5, cfg)["l0.weight"]
    assert (m.reshape(-1, 4).sum(1) == 2).all()
    assert nm_valid(w["l0.weight"] * m, 2, 4)
    assert not nm_valid(torch.ones(2, 8), 2, 4)
    # the two kept are the two largest of each group; ties keep the lower index
    assert nm_keep_mask(torch.tensor([[1.0, 4.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0]]), 2, 4).tolist() == [
        [False, True, False, True, True, True, False, False]]
    assert compute_masks(w, 0.0, cfg)["l0.weight"].all()  # switched off before the schedule starts


def test_erk_sums_to_global_target_and_favours_small_layers():
    shapes = {"a": (64, 64), "b": (64, 256), "c": (256, 64), "d": (8, 512), "e": (3, 5)}
    total = sum(r * c for r, c in shapes.values())
    for s in (0.5, 0.8, 0.9, 0.95):
        counts = allocation.erk_counts(shapes, s, MaskConfig())
        assert sum(counts.values()) == allocation.prune_count(total, s)
        assert all(0 <= counts[n] <= r * c for n, (r, c) in shapes.items())
    counts = allocation.erk_counts(shapes, 0.9, MaskConfig())
    density = {n: 1 - counts[n] / (r * c) for n, (r, c) in shapes.items()}
    assert density["e"] == 1.0  # tiny layer kept dense
    assert density["a"] > density["b"]  # (64+64)/64^2 > (64+256)/(64*256)
    w = _weights(list(shapes.values()))
    masks = compute_masks(w, 0.9, PruningConfig(allocation="erk"))
    assert sum(int((~m).sum()) for m in masks.values()) == allocation.prune_count(total, 0.9)


def test_global_threshold():
    w = _weights([(32, 32), (16, 64)])
    w["l1.weight"] *= 10  # layer 1 has larger magnitudes: global pruning hits layer 0 harder
    masks = compute_masks(w, 0.6, PruningConfig(allocation="global"))
    total = sum(t.numel() for t in w.values())
    assert sum(int((~m).sum()) for m in masks.values()) == allocation.prune_count(total, 0.6)
    pruned_max = max(w[n].abs()[~m].max() for n, m in masks.items())
    kept_min = min(w[n].abs()[m].min() for n, m in masks.items())
    assert pruned_max <= kept_min
    assert (~masks["l0.weight"]).float().mean() > (~masks["l1.weight"]).float().mean()


def test_gradual_masks_are_nested():
    w = _weights([(32, 48)])
    cfg = PruningConfig()
    prev = None
    for s in (0.2, 0.5, 0.8, 0.9):
        masked = {n: t * prev[n] for n, t in w.items()} if prev else w
        cur = compute_masks(masked, s, cfg)
        if prev:
            assert not bool((cur["l0.weight"] & ~prev["l0.weight"]).any())  # nothing grows back
        prev = cur
