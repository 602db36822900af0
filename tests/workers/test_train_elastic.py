"""Elastic resume on real Ray Train + DeepSpeed (CPU): a student stage that crashed after its step-3
checkpoint resumes on another number of workers (1 -> 2 at ZeRO-2, 2 -> 1 at ZeRO-3: each ZeRO stage's
universal-checkpoint conversion, growing and shrinking; 2 -> 1 at ZeRO-2 was left out for the suite's time) and
matches an uninterrupted run with the original worker count: the same global batches (their digest
at every step), every later step's loss within 1e-4 (only the reduction order differs; 1e-3 once masks are recomputed from weights trained after the resume), the same
final masks. The model has no dropout, the one thing that draws from a per-worker random stream."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from ray.train import TrainingFailedError

from tests.workers.train_fixture import (checkpoint_masks, committed_steps, make_preprocess, make_teacher_export,
                                        start_ray, student_spec)
from workers.train.checkpoint_parts import UNIVERSAL
from workers.train.checkpointer import read_manifest
from workers.train.driver import run_training
from workers.train.spec import FaultInjection

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

CRASH_AT = 3
REMASKED_AFTER_RESUME = 6  # the first step whose masks were computed from weights trained after the resume


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    start_ray()
    root = str(tmp_path_factory.mktemp("elastic-base"))
    make_preprocess(root)
    make_teacher_export(root, dropout=0.0)
    return root


def _run_dir(base: str, tmp_path_factory, name: str) -> str:
    target = str(tmp_path_factory.mktemp(name))
    shutil.copytree(base, target, dirs_exist_ok=True)
    return target


def _steps(spec) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed run logs the steps after its checkpoint)."""
    out: dict[int, dict] = {}
    with open(spec.run.metrics) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec
    return out


def _reference(base, tmp_path_factory, workers: int, zero: int):
    spec = student_spec(_run_dir(base, tmp_path_factory, f"ref-{workers}-{zero}"), num_workers=workers,
                        zero_stage=zero, checkpoint_every=1)
    run_training(spec, echo=False)
    return spec


def _elastic(base, tmp_path_factory, before: int, after: int, zero: int):
    run_dir = _run_dir(base, tmp_path_factory, f"elastic-{before}-{after}-{zero}")
    crashing = student_spec(run_dir, num_workers=before, zero_stage=zero, checkpoint_every=1, keep_checkpoints=10,
                            fault=FaultInjection(step=CRASH_AT, marker=f"{run_dir}/crashed"))
    with pytest.raises(TrainingFailedError):
        run_training(crashing, echo=False)  # max_failures=0: the stage stops, its checkpoints stay
    assert committed_steps(crashing)[0] == CRASH_AT
    resumed = student_spec(run_dir, num_workers=after, zero_stage=zero, checkpoint_every=1, keep_checkpoints=10)
    result = run_training(resumed, echo=False)
    return resumed, result


@pytest.mark.parametrize("before, after, zero", [(1, 2, 2), (2, 1, 3)])
def test_a_crashed_stage_resumes_on_another_worker_count(base, tmp_path_factory, before, after, zero) -> None:
    reference = _reference(base, tmp_path_factory, before, zero)
    resumed, result = _elastic(base, tmp_path_factory, before, after, zero)
    assert result.start_steps == [0, CRASH_AT] and result.final_step == 6
    ref, got = _steps(reference), _steps(resumed)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step]["data/batch"] == ref[step]["data/batch"], step  # the same samples in every global batch
        # only the reduction order differs, until the masks are recomputed from weights trained after the
        # resume (before step 6): a few near-threshold entries may then flip (bounded below), and the loss
        # they shape moves by a few 1e-4 (ZeRO-3 2 -> 1 on the preprocess output of the unit readers: 3.6e-4)
        tolerance = 1e-4 if step < REMASKED_AFTER_RESUME else 1e-3
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], abs=tolerance), step
        assert got[step]["lr"] == pytest.approx(ref[step]["lr"], rel=1e-12), step  # the LR schedule went on
    final, expected = checkpoint_masks(resumed.run, 6), checkpoint_masks(reference.run, 6)
    # Another worker count sums the gradients in another order (losses agree to ~1e-5, not bit for bit), and
    # the last mask update (schedule step 4, after the resume) ranks the stored values of pruned weights, many
    # of them near the threshold: a few entries may fall on the other side (ZeRO-3 2 -> 1: 28 of 69,632).
    # Every layer keeps exactly its count.
    assert final.keys() == expected.keys()
    differ = sum(int((final[k] != expected[k]).sum()) for k in final)
    assert differ <= 1e-3 * sum(m.numel() for m in final.values()), differ
    assert all(int(final[k].sum()) == int(expected[k].sum()) for k in final)
    layout, run = resumed.layout, resumed.run
    manifest = read_manifest(layout, layout.rel(run.checkpoint_step(CRASH_AT)), run.stage)
    assert any(n.startswith(UNIVERSAL + "/") for n in manifest.files)  # converted once, committed with it
    assert read_manifest(layout, layout.rel(run.checkpoint_step(6)), run.stage).world_size == after
