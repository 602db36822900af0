"""A stage owns its contract: a stage defined only in this test, registered and named in a recipe,
runs through the job graph and reads right in the console line, the closing table, `pofa status`,
`pofa runs`, the plan of a rerun (skip, resume at its progress, refusal naming that progress) and the
stall budget, with no edit anywhere else."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import pytest
from pydantic import BaseModel

from orchestrator.cli import main
from orchestrator.job_graph import run_pipeline
from orchestrator.plan import PlanRefused
from orchestrator.recipe.load import load_recipe
from orchestrator.recipe.schema import Recipe
from orchestrator.run_status import run_state
from orchestrator.run_summary import summary_lines
from orchestrator.stages import STAGES
from orchestrator.stages.base import Stage, StageContext, StageResult
from orchestrator.stall_budget import StallBudgetError, check_stall_budget
from pipelines.atomic import file_sha256, write_json_atomic
from workers.run_layout import RunLayout
from workers.run_records import AttemptRecord, append_record
from workers.stage_outputs import StageManifest

PARTS = 3


class CountOutput(BaseModel):
    counts: str  # relative to the run directory
    words: int


class WordCountStage(Stage):
    """Counts the words of the recipe's description in parts, keeping each finished part (its progress);
    `fail_after` parts it raises, as a killed attempt would stop."""

    name = "wordcount"
    output_model = CountOutput
    needs_ray = False
    headline = True
    fail_after: Optional[int] = None

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"seed": recipe.seed}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return {}

    def _part(self, layout: RunLayout, i: int) -> str:
        return layout.path(self.name, "parts", f"{i}.json")

    def run(self, ctx: StageContext) -> StageResult:
        words = ctx.recipe.description.split()
        for i in range(PARTS):
            if os.path.exists(self._part(ctx.layout, i)):
                continue  # done by an earlier attempt
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError(f"wordcount stopped before part {i}")
            write_json_atomic({"words": len(words[i::PARTS])}, self._part(ctx.layout, i))
        total = sum(json.load(open(self._part(ctx.layout, i)))["words"] for i in range(PARTS))
        counts = ctx.layout.path(self.name, "counts.json")
        write_json_atomic({"words": total}, counts)
        return StageResult({"words": total}, {"counts.json": file_sha256(counts)},
                           CountOutput(counts=ctx.layout.rel(counts), words=total))

    def result(self, manifest: StageManifest, layout: RunLayout) -> str:
        return f"{manifest.output['words']} words"

    def held(self, layout: RunLayout) -> list[str]:
        done = sum(os.path.exists(self._part(layout, i)) for i in range(PARTS))
        return [f"{done} of {PARTS} parts counted"] if done else []

    def progress(self, layout: RunLayout, recipe: Recipe) -> Optional[str]:
        done = sum(os.path.exists(self._part(layout, i)) for i in range(PARTS))
        return f"at step {done} of {PARTS} (parts/)" if done else None

    def resume_point(self, layout: RunLayout) -> str:
        return f"resuming from part {sum(os.path.exists(self._part(layout, i)) for i in range(PARTS))}"

    def attempt_files(self, layout: RunLayout) -> list[str]:
        return [layout.path(self.name, "attempts.jsonl")]


@pytest.fixture
def stage(monkeypatch) -> WordCountStage:
    counted = WordCountStage()
    monkeypatch.setitem(STAGES, counted.name, counted)  # the one registration
    return counted


def _recipe(seed: int = 42) -> Recipe:
    raw = load_recipe("tiny").model_dump(mode="json")
    return Recipe.model_validate({**raw, "stages": ["wordcount"], "seed": seed,
                                  "description": "one two three four five six seven"})


def test_an_unregistered_stage_in_a_recipe_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown stage\(s\) 'wordcount' \(known: preprocess, teacher, student"):
        _recipe()


def test_a_new_stage_runs_and_reads_right_everywhere(stage, tmp_path, capsys) -> None:
    run_dir = str(tmp_path / "run")
    recipe = _recipe()
    stage.fail_after = 2
    said: list[str] = []
    with pytest.raises(RuntimeError, match="before part 2"):
        run_pipeline(recipe, run_dir, console=said.append)
    assert "[wordcount] running" in said and "[wordcount] failed: RuntimeError: wordcount stopped before part 2" in said

    # status: failed, with what a rerun keeps; the plan of a rerun resumes there
    state = {s.stage: s for s in run_state(run_dir).stages}["wordcount"]
    assert state.state == "failed" and "at step 2 of 3 (parts/)" in state.detail
    assert main(["status", run_dir]) == 0
    assert "wordcount  failed       RuntimeError: wordcount stopped before part 2" in capsys.readouterr().out
    os.remove(os.path.join(run_dir, "wordcount", "failure.json"))
    state = {s.stage: s for s in run_state(run_dir).stages}["wordcount"]
    assert state.state == "resumable" and state.detail == "at step 2 of 3 (parts/)"

    # a changed result-defining key with progress held: refused, naming the stage's own progress
    with pytest.raises(PlanRefused, match=r"(?s)\[wordcount\] changed since its unfinished attempt: seed 42 -> 7\n *redoing it deletes 2 of 3 parts counted"):
        run_pipeline(_recipe(seed=7), run_dir, console=said.append)

    stage.fail_after = None
    said.clear()
    manifests = run_pipeline(recipe, run_dir, console=said.append)
    assert "[wordcount] resuming from part 2" in said
    assert manifests["wordcount"].output["words"] == 7
    assert any(line.startswith("[wordcount] done in ") and line.endswith(": 7 words") for line in said)
    table = [line for line in summary_lines(manifests, RunLayout.open(run_dir)) if line.startswith("wordcount ")]
    assert len(table) == 1 and "7 words" in table[0] and table[0].endswith(os.path.join(run_dir, "wordcount"))

    state = run_state(run_dir)
    assert [(s.stage, s.state, s.result) for s in state.stages] == [("wordcount", "done", "7 words")]
    assert state.one_line().endswith("wordcount: 7 words")  # `pofa runs`: a headline stage

    said.clear()
    run_pipeline(recipe, run_dir, console=said.append)  # done: skipped, nothing rerun
    assert any(line.startswith("[wordcount] up to date") for line in said), said


def test_the_stall_budget_reads_the_stage_s_own_attempt_records(stage, tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path / "run"))
    os.makedirs(layout.stage_dir("wordcount"))
    # the record a training attempt appends (workers.run_records), as the stage's own file
    append_record(AttemptRecord(start_step=0, checkpoint=None, time=time.time(), startup_s=42.0),
                  layout.path("wordcount", "attempts.jsonl"))
    check_stall_budget(43, layout, ["wordcount"])
    with pytest.raises(StallBudgetError, match="shorter than a start-up this run measured: 42 s"):
        check_stall_budget(41, layout, ["wordcount"])
