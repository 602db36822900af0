"""The run layout: every path inside the run directory, one notion of "inside" (symlinks resolved),
and the same answers for the driver and the workers (it is what they are handed)."""
from __future__ import annotations

import os
import pickle

import pytest

from workers.run_layout import LayoutError, RunLayout


def test_paths_cannot_escape(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path / "run"))
    assert layout.split_dir("train") == os.path.join(layout.root, "preprocess", "train")
    with pytest.raises(LayoutError, match="outside the run directory"):
        layout.path("..", "elsewhere")
    os.makedirs(layout.root)
    os.symlink("/etc", os.path.join(layout.root, "sneaky"))
    with pytest.raises(LayoutError, match="outside the run directory"):
        layout.path("sneaky", "passwd")
    with pytest.raises(LayoutError, match="not a plain folder name"):
        layout.task_dir("../../x")
    with pytest.raises(LayoutError, match="split"):
        layout.split_dir("test")
    with pytest.raises(LayoutError, match="outside"):
        layout.rel("/etc/passwd")


def test_a_run_directory_reached_through_a_symlink_is_one_place(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "alias")
    via_alias, direct = RunLayout.open(str(tmp_path / "alias")), RunLayout.open(str(real))
    assert via_alias.root == direct.root == str(real)
    assert via_alias.rel(os.path.join(str(tmp_path / "alias"), "teacher", "model")) == "teacher/model"


def test_training_and_finetuning_runs_share_one_layout(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    teacher = layout.training("teacher")
    seed = layout.finetune_run("sst2", "seed-42")
    assert teacher.checkpoints == os.path.join(layout.root, "teacher", "checkpoints")
    assert seed.model == os.path.join(layout.root, "finetune", "sst2", "seed-42", "model")
    assert seed.ray_run_name == "pofa-finetune-sst2-seed-42" and teacher.ray_run_name == "pofa-teacher"
    assert layout.stage_rel("finetune", seed.model) == "sst2/seed-42/model"
    with pytest.raises(LayoutError, match="not inside the teacher"):
        layout.stage_rel("teacher", seed.model)
    assert pickle.loads(pickle.dumps(layout)) == layout  # Ray ships it to every worker
