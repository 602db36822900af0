"""The checkpointer on local disk, without DeepSpeed: named parts that round-trip through
state_dict -> files -> load_state_dict and continue identically (at world size 1 and 2), commit by
manifest, sha256 checks before anything is unpickled, fallback from a broken newest checkpoint,
retention, and checkpoints of another pofa version refused."""
from __future__ import annotations

import json
import os
import random
import socket
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from pipelines.sparsity.callback import PruningCallback
from pipelines.sparsity.config import PruningConfig, ScheduleConfig
from pipelines.training.schedule import linear_lr
from workers.run_layout import RunLayout
from workers.train.checkpoint_parts import DS_TAG, LRPosition, RNGState, ValuePart
from workers.train.checkpointer import CORRUPT, MANIFEST, Checkpointer, CheckpointError, read_manifest
from workers.train.data import DataCursor


class FileEngine:
    """Stands in for the DeepSpeed engine part: a torch zip per rank, as ZeRO writes them."""

    def __init__(self, rank: int, value: float = 0.0) -> None:
        self.rank, self.value = rank, value

    def save(self, folder: str, step: int) -> None:
        os.makedirs(os.path.join(folder, DS_TAG), exist_ok=True)
        torch.save({"w": torch.full((256,), self.value + self.rank)},
                   os.path.join(folder, DS_TAG, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))
        if self.rank == 0:
            torch.save({"model": torch.ones(8)}, os.path.join(folder, DS_TAG, "mp_rank_00_model_states.pt"))

    def load(self, folder: str) -> None:
        self.value = float(torch.load(os.path.join(folder, DS_TAG, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"))
                           ["w"][0]) - self.rank


class Trainer:
    """A toy training state with every kind of part a worker has: step and global batch, LR position,
    pruning masks and schedule, data cursor and RNG."""

    def __init__(self, layout: RunLayout, rank: int = 0, world: int = 1, keep: int = 2,
                 warn: Callable[[str], None] = lambda _: None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        cfg = PruningConfig(schedule=ScheduleConfig(policy_begin_step=0, policy_end_step=4, begin_pruning_step=0,
                                                    end_pruning_step=4, pruning_frequency=2, final_sparsity=0.8),
                            include=[r"weight$"], exclude=[])
        self.pruning = PruningCallback(self.model, cfg)
        self.step, self.cursor = 0, DataCursor()
        self.lr_fn = lambda s: linear_lr(s, base_lr=1e-3, total_steps=10, warmup_ratio=0.1)
        self.engine = FileEngine(rank)
        self.checkpointer = Checkpointer(
            layout, layout.training("student"), rank, world, keep, engine=self.engine,
            parts={"model": ValuePart(lambda: dict(self.model.state_dict()), self.model.load_state_dict),
                   "train_state": ValuePart(lambda: {"step": self.step, "global_batch_size": 8},
                                            lambda s: setattr(self, "step", int(s["step"]))),
                   "lr": LRPosition(lambda s: self.lr_fn(s), lambda: self.step), "pruning": self.pruning},
            rank_parts={"data": ValuePart(lambda: self.cursor.to_dict(),
                                          lambda s: setattr(self, "cursor", DataCursor(**s))),
                        "rng": RNGState()},
            warn=warn)

    def train_step(self) -> tuple:
        """What the next step draws and computes: RNG draws, masks, LR, the data position."""
        self.pruning.on_step_begin(self.step)
        draws = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
        self.pruning.before_step()
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        self.pruning.on_step_end(self.step)
        out = (self.step, draws, self.lr_fn(self.step), self.cursor, {k: v.clone() for k, v in self.pruning.masks.items()})
        self.step += 1
        self.cursor = DataCursor(self.cursor.epoch, self.cursor.position + 8)
        self.engine.value += 1.0
        return out


def _same(a: tuple, b: tuple) -> bool:
    return a[:4] == b[:4] and a[4].keys() == b[4].keys() and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


def _train(layout: RunLayout, rank: int, world: int) -> tuple[list[tuple], list[tuple], Trainer]:
    """3 steps, a checkpoint, 3 more (the reference); then a fresh trainer restores and redoes them."""
    first = Trainer(layout, rank, world)
    for _ in range(3):
        first.train_step()
    first.checkpointer.save(first.step)
    reference = [first.train_step() for _ in range(3)]
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # a new process starts elsewhere
    second = Trainer(layout, rank, world)
    restored = second.checkpointer.restore()
    assert restored is not None and restored[0] == 3
    assert second.engine.value == 3.0
    return reference, [second.train_step() for _ in range(3)], second


def test_every_part_round_trips_and_continues_identically(tmp_path) -> None:
    reference, resumed, second = _train(RunLayout.open(str(tmp_path)), 0, 1)
    assert all(_same(a, b) for a, b in zip(reference, resumed))
    # the schedule went on from where it was (schedule step 4: computed before update 6)
    assert second.pruning.last_update_step == 5 and second.pruning.masks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, root: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        reference, resumed, _ = _train(RunLayout.open(root), rank, world)
        ok = all(_same(a, b) for a, b in zip(reference, resumed))
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"ok": ok}, f)
    finally:
        dist.destroy_process_group()


def test_two_ranks_save_their_own_parts_and_restore_them(tmp_path) -> None:
    root, out = str(tmp_path / "run"), str(tmp_path / "result")
    mp.spawn(_rank_main, args=(2, _free_port(), root, out), nprocs=2, join=True)
    assert all(json.load(open(f"{out}.{r}"))["ok"] for r in range(2))
    layout = RunLayout.open(root)
    step = layout.training("student").checkpoint_step(3)
    manifest = read_manifest(layout, layout.rel(step), "student")
    assert manifest.world_size == 2 and manifest.parts == ["lr", "model", "pruning", "train_state"]
    files = set(manifest.files)
    assert {"rank-0.data.json", "rank-1.data.json", "rank-0.rng.json", "rank-1.rng.safetensors"} <= files
    assert {f"{DS_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt", f"{DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert all(len(info.sha256) == 64 for info in manifest.files.values())
    with safe_open(os.path.join(step, "pruning.safetensors"), framework="pt") as f:  # tensors without pickle
        keys = set(f.keys())  # masks, and the stored values of a model without a master copy (this toy)
        assert all(k.startswith(("masks/", "stored/")) for k in keys)
        names = {prefix: {k.split("/", 1)[1] for k in keys if k.startswith(prefix)} for prefix in ("masks/", "stored/")}
        assert names["masks/"] and names["stored/"] == names["masks/"]


def _saved(layout: RunLayout, steps: list[int], keep: int = 10, warn: Optional[list] = None) -> Trainer:
    trainer = Trainer(layout, keep=keep, warn=(warn.append if warn is not None else lambda _: None))
    for step in steps:
        while trainer.step < step:
            trainer.train_step()
        trainer.checkpointer.save(trainer.step)
    return trainer


def test_retention_keeps_the_newest_committed(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    trainer = _saved(layout, [1, 2, 3, 4], keep=2)
    assert [s for s, _ in trainer.checkpointer.committed()] == [4, 3]
    names = os.listdir(layout.training("student").checkpoints)
    assert sorted(names) == ["step-00000003", "step-00000004"]  # no staging folder left behind


def _shard(layout: RunLayout, step: int) -> str:
    return os.path.join(layout.training("student").checkpoint_step(step), DS_TAG,
                        "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_a_broken_newest_checkpoint_is_set_aside_and_the_previous_used(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    _saved(layout, [2, 4])
    shard = _shard(layout, 4)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    warnings: list[str] = []
    fresh = Trainer(layout, warn=warnings.append)
    assert fresh.checkpointer.restore()[0] == 2
    assert len(warnings) == 1 and "zero_pp_rank_0" in warnings[0]
    run = layout.training("student")
    aside = [n for n in os.listdir(run.checkpoints) if n.startswith("corrupt-step-00000004-")]
    # un-committed and moved aside, not deleted: the files stay, CORRUPT.json holds the manifest to undo it
    assert len(aside) == 1 and not os.path.exists(run.checkpoint_step(4))
    folder = os.path.join(run.checkpoints, aside[0])
    assert not os.path.exists(os.path.join(folder, MANIFEST))
    assert os.path.exists(os.path.join(folder, DS_TAG, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert json.load(open(os.path.join(folder, CORRUPT)))["manifest"]["step"] == 4
    # a crash's leftovers: a staging folder of this rank, an uncommitted step; then the next commit
    os.makedirs(os.path.join(run.checkpoints, ".tmp-step-00000009.rank-0"))
    os.makedirs(os.path.join(run.checkpoints, "step-00000007"))
    fresh.train_step()
    fresh.checkpointer.save(fresh.step)
    # stale temporary, set-aside and uncommitted folders go once a newer checkpoint is committed
    assert sorted(os.listdir(run.checkpoints)) == ["step-00000002", "step-00000003"]


def test_same_size_corruption_is_caught_before_unpickling(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    _saved(layout, [2, 4])
    shard = _shard(layout, 4)
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    warnings: list[str] = []
    assert Trainer(layout, warn=warnings.append).checkpointer.restore()[0] == 2
    assert "sha256" in warnings[0]


def test_half_written_checkpoints_are_never_candidates(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    trainer = _saved(layout, [2, 6])
    run = layout.training("student")
    os.makedirs(os.path.join(run.checkpoints, ".tmp-step-00000008.rank-0"))  # a crash while staging
    os.remove(os.path.join(run.checkpoint_step(6), MANIFEST))  # a crash before the commit
    assert [s for s, _ in trainer.checkpointer.committed()] == [2]
    assert Trainer(layout).checkpointer.restore()[0] == 2


def test_a_checkpoint_from_another_version_is_refused_not_set_aside(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    _saved(layout, [2])
    path = os.path.join(layout.training("student").checkpoint_step(2), MANIFEST)
    manifest = json.load(open(path))
    manifest["format"] = 1
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CheckpointError, match="another pofa version"):
        Trainer(layout).checkpointer.restore()
    assert os.path.exists(path)


def test_a_changed_lr_schedule_is_named(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    _saved(layout, [3])
    fresh = Trainer(layout)
    fresh.lr_fn = lambda s: 2 * linear_lr(s, base_lr=1e-3, total_steps=10, warmup_ratio=0.1)
    with pytest.raises(ValueError, match="LR schedule changed"):
        fresh.checkpointer.restore()


