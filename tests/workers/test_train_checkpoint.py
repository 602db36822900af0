"""Checkpoint folders: manifest, verification, fallback from a broken newest one, retention,
and state files that load without unpickling."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tests.workers.train_fixture import fake_checkpoint
from workers.train import checkpoint as ckpt
from workers.train import state as st
from workers.train.data import DataCursor


def test_newest_valid_checkpoint_is_chosen(tmp_path):
    root = str(tmp_path)
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [6, 4, 2]
    assert ckpt.latest_valid_checkpoint(root)[0] == 6


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    root = str(tmp_path)
    fake_checkpoint(root, 2)
    newest = fake_checkpoint(root, 4)
    shard = os.path.join(newest, ckpt.DS_TAG, "zero_pp_rank_1_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    warnings: list[str] = []
    step, path = ckpt.latest_valid_checkpoint(root, warn=warnings.append)
    assert step == 2 and path.endswith(ckpt.step_dir_name(2))
    assert len(warnings) == 1 and "zero_pp_rank_1" in warnings[0]
    assert not os.path.exists(newest)  # set aside, not deleted
    assert any(name.startswith("corrupt-step-00000004") for name in os.listdir(root))


def test_same_size_corruption_is_caught_by_the_zip_checksums(tmp_path):
    path = fake_checkpoint(str(tmp_path), 2)
    shard = os.path.join(path, ckpt.DS_TAG, "zero_pp_rank_0_optim_states.pt")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    assert "zero_pp_rank_0" in (ckpt.verify_checkpoint(path) or "")


def test_half_written_checkpoints_are_never_candidates(tmp_path):
    root = str(tmp_path)
    fake_checkpoint(root, 2)
    os.makedirs(os.path.join(root, ckpt.tmp_dir_name(4)))  # crash before the rename
    no_manifest = fake_checkpoint(root, 6)
    os.remove(os.path.join(no_manifest, ckpt.MANIFEST))  # crash before the manifest
    missing_rank = fake_checkpoint(root, 8)
    os.remove(os.path.join(missing_rank, "rank-1.json"))
    assert "rank-1.json" in ckpt.verify_checkpoint(missing_rank)
    assert "MANIFEST" in ckpt.verify_checkpoint(no_manifest)
    assert ckpt.latest_valid_checkpoint(root, warn=lambda _: None)[0] == 2


def test_retention_keeps_the_newest(tmp_path):
    root = str(tmp_path)
    for step in (2, 4, 6, 8):
        fake_checkpoint(root, step)
    removed = ckpt.prune_checkpoints(root, keep=2)
    assert sorted(os.path.basename(p) for p in removed) == [ckpt.step_dir_name(2), ckpt.step_dir_name(4)]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [8, 6]


def test_rng_and_cursor_round_trip_per_rank(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    st.save_rank_state(str(tmp_path), 1, 2, 5, DataCursor(3, 40))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    cursor = st.load_rank_state(str(tmp_path), 1, 2)
    assert cursor == DataCursor(3, 40)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    with pytest.raises(ValueError, match="num_workers=2"):
        st.load_rank_state(str(tmp_path), 1, 4)


def test_pruning_state_is_stored_without_pickle(tmp_path):
    masks = {"bert.encoder.layer.0.intermediate.dense.weight": torch.rand(8, 4) > 0.5}
    state = {"version": 1, "masks": masks, "last_update_step": 4, "sparsity": 0.5, "config": {"method": "gmp"}}
    st.save_pruning_state(str(tmp_path), state)
    with safe_open(str(tmp_path / "pruning.safetensors"), framework="pt") as f:  # a safe format
        assert list(f.keys()) == list(masks)
    back = st.load_pruning_state(str(tmp_path))
    assert back["last_update_step"] == 4 and back["config"] == {"method": "gmp"}
    name = next(iter(masks))
    assert back["masks"][name].dtype == torch.bool and torch.equal(back["masks"][name], masks[name])
    assert st.load_pruning_state(str(tmp_path / "none")) is None
