"""What a rerun does to each stage, from the run directory alone: operational changes resume, a
changed result-defining key of a stage with progress is refused (naming the key, its old and new
value and what would be lost), `--redo` goes ahead, and nothing is deleted before that."""
from __future__ import annotations

import json
import os
import time

import pytest

from orchestrator.job_graph import _prepare_attempt, check_redo
from orchestrator.fingerprints import fingerprint, write_stage_manifest
from orchestrator.plan import plan_run, refusal
from orchestrator.recipe.load import load_recipe
from orchestrator.rundir import RunDir, choose_run_dir
from orchestrator.stages import STAGES, StageContext
from workers.stage_outputs import PreprocessOutput, TrainingOutput
from workers.run_records import CheckpointManifest, dump_record
from workers.train.checkpointer import FORMAT, MANIFEST

STAGES_RUN = ["preprocess", "teacher", "student"]


def _finish(rd: RunDir, recipe, stage: str) -> None:
    """A stage's manifest as the job graph writes it, with the record its consumers read."""
    ctx = StageContext(recipe, rd)
    config, inputs = STAGES[stage].config(recipe), STAGES[stage].inputs(ctx)
    fp = fingerprint({"stage": stage, "config": config, "inputs": inputs})
    _prepare_attempt(rd.layout, stage, fp, config, inputs, clean=False)
    if stage == "preprocess":
        output = PreprocessOutput(splits={"train": {"shards": [], "rows": 0}, "validation": {"shards": [], "rows": 0}},
                                  tokenizer="preprocess/tokenizer", vocab_size=10, max_seq_length=128,
                                  masking={"kind": "dynamic", "masked_lm_prob": 0.15, "max_predictions_per_seq": 20})
    else:
        output = TrainingOutput(model=f"{stage}/model", final_step=500)
    write_stage_manifest(rd.layout, stage, fp, inputs, config, {}, {}, output, time.time())


def _checkpoint(rd: RunDir, stage: str, step: int) -> None:
    rel = rd.layout.rel(rd.layout.training(stage).checkpoint_step(step))
    manifest = CheckpointManifest(format=FORMAT, step=step, world_size=2, created=time.time(), parts=[], rank_parts=[],
                                  files={})
    rd.layout.store.write_json(f"{rel}/{MANIFEST}", dump_record(manifest))


def _start(rd: RunDir, recipe, stage: str) -> None:
    """An unfinished attempt: its attempt record, as the job graph writes it."""
    ctx = StageContext(recipe, rd)
    config, inputs = STAGES[stage].config(recipe), STAGES[stage].inputs(ctx)
    _prepare_attempt(rd.layout, stage, fingerprint({"stage": stage, "config": config, "inputs": inputs}),
                     config, inputs, clean=False)


@pytest.fixture
def run(tmp_path):
    """preprocess finished, teacher interrupted after its step-300 checkpoint."""
    recipe = load_recipe("tiny")
    rd = RunDir(str(tmp_path / "run"))
    _finish(rd, recipe, "preprocess")
    _start(rd, recipe, "teacher")
    _checkpoint(rd, "teacher", 200)
    _checkpoint(rd, "teacher", 300)
    return rd


def _plan(rd: RunDir, *overrides: str, redo=(), force=False):
    recipe = load_recipe("tiny", list(overrides))
    return {p.stage: p for p in plan_run(recipe, StageContext(recipe, rd), STAGES_RUN, force, redo)}


def test_operational_changes_resume(run) -> None:
    plans = _plan(run, "teacher.num_workers=1", "teacher.keep_checkpoints=3", "teacher.checkpoint_every=50",
                  "teacher.max_failures=5", "teacher.eval_every=10", "preprocess.num_workers=1", "ray.num_cpus=8")
    assert plans["preprocess"].action == "skip"
    assert plans["teacher"].action == "resume" and plans["teacher"].reason == "resuming from step 300 (checkpoint teacher/checkpoints/step-00000300)"
    assert plans["student"].action == "run" and not any(p.refused for p in plans.values())


def test_a_result_defining_change_is_refused_naming_the_key(run) -> None:
    plans = _plan(run, "teacher.learning_rate=0.001")
    teacher = plans["teacher"]
    assert teacher.action == "redo" and teacher.refused
    assert ("teacher.learning_rate", 0.002, 0.001) in teacher.changes
    text = refusal(list(plans.values()))
    assert "teacher.learning_rate 0.002 -> 0.001" in text and "2 committed checkpoint(s) (newest at step 300)" in text
    assert "--redo teacher" in text and "nothing was deleted" in text
    assert os.path.exists(run.layout.training("teacher").checkpoint_step(300))


def test_redo_goes_ahead_and_its_consent_covers_what_follows(run) -> None:
    recipe = load_recipe("tiny")
    _finish(run, recipe, "teacher")
    _finish(run, recipe, "student")
    assert all(p.action == "skip" for p in _plan(run).values())
    plans = _plan(run, "teacher.learning_rate=0.001", redo=["teacher"])
    assert plans["teacher"].action == "redo" and not plans["teacher"].refused
    assert plans["student"].action == "redo" and not plans["student"].refused  # its input is redone
    # a changed upstream without the user's word: the finished student is not thrown away
    plans = _plan(run, "preprocess.max_predictions_per_seq=5", redo=[])
    assert plans["preprocess"].refused and "preprocess.max_predictions_per_seq 20 -> 5" in plans["preprocess"].reason


def test_a_manifest_of_an_older_pofa_with_operational_keys_in_its_config_is_current(run) -> None:
    path = run.layout.manifest("preprocess")
    manifest = json.load(open(path))
    manifest["config"]["preprocess"]["num_workers"] = 7  # older pofas fingerprinted these too
    manifest["fingerprint"] = "0" * 32
    json.dump(manifest, open(path, "w"))
    assert _plan(run)["preprocess"].action == "skip"


def test_a_student_made_with_the_old_method_semantics_is_refused_naming_the_keys(run) -> None:
    """A student finished by pofa before the reference's semantics: its manifest's config has none of
    the new keys. Its run directory is never silently continued with other semantics."""
    recipe = load_recipe("tiny")
    _finish(run, recipe, "teacher")
    _finish(run, recipe, "student")
    path = run.layout.manifest("student")
    manifest = json.load(open(path))
    student = manifest["config"]["student"]
    for key in ("pruned_weights", "lr_rewind_window", "lr_rewind_clamp"):
        del student["pruning"][key]
    del student["distillation"]["mlm_nsp_kd"]
    manifest["fingerprint"] = "0" * 32
    json.dump(manifest, open(path, "w"))
    plans = _plan(run)
    assert plans["student"].action == "redo" and plans["student"].refused
    text = refusal(list(plans.values()))
    for key, value in (("student.pruning.pruned_weights", "keep"), ("student.pruning.lr_rewind_window", "policy"),
                       ("student.distillation.mlm_nsp_kd", "sum")):
        assert f"{key} (unset) -> '{value}'" in text, text
    assert "--redo student" in text


def test_unknown_redo_stage_is_an_error() -> None:
    with pytest.raises(ValueError, match="--redo: unknown stage.*teachr"):
        check_redo(["teachr"])


def test_without_run_dir_an_operational_change_reuses_the_run_and_a_result_change_starts_a_new_one(tmp_path) -> None:
    root = str(tmp_path / "runs")
    recipe = load_recipe("tiny")
    first = choose_run_dir(recipe, None, root)
    RunDir(first).write_recipe(recipe)
    assert choose_run_dir(load_recipe("tiny", ["teacher.num_workers=1", "student.keep_checkpoints=5"]), None,
                          root) == first
    other = choose_run_dir(load_recipe("tiny", ["teacher.learning_rate=0.01"]), None, root)
    assert other != first and not os.path.exists(other)
