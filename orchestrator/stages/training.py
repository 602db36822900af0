"""Stages 2 and 3: teacher preparation (dense MLM+NSP) and student pruning (GMP + distillation).

Both run as Ray Train jobs with a DeepSpeed engine per worker (`workers/train`). Their Ray Train
storage lives in the stage directory, so rerunning the pipeline after a crash resumes from the last
good checkpoint of the unfinished stage.
"""
from __future__ import annotations

import os
from typing import Any

from orchestrator.manifest import read_manifest
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import StageContext, StageResult
from pipelines.atomic import file_sha256


def _model_outputs(stage_dir: str) -> dict[str, str]:
    model_dir = os.path.join(stage_dir, "model")
    out = {}
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            out[f"model/{name}"] = file_sha256(path)
    return out


def _upstream(ctx: StageContext, *stages: str) -> dict[str, Any]:
    """Fingerprints of the stages this one reads: a redone upstream stage makes this one stale."""
    return {s: (read_manifest(ctx.run_dir.stage_dir(s)) or {}).get("fingerprint") for s in stages}


def _stats(result) -> dict[str, Any]:
    return {"final_step": result.final_step, "start_steps": result.start_steps,
            "train_time_s": round(result.elapsed_s, 3), **result.metrics}


class TeacherStage:
    name = "teacher"

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "model": recipe.model.model_dump(mode="json"),
                "teacher": recipe.teacher.model_dump(mode="json")}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return _upstream(ctx, "preprocess")

    def run(self, ctx: StageContext) -> StageResult:
        from workers.train.spec import TrainSpec
        from workers.train.stage import run_training

        spec = TrainSpec(stage="teacher", run_dir=ctx.run_dir.path, train=ctx.recipe.teacher,
                         model=ctx.recipe.model, seed=ctx.recipe.seed, tracker=ctx.tracker,
                         resource_wait_s=ctx.recipe.ray.resource_wait_s, store=ctx.run_dir.store)
        result = run_training(spec)
        return StageResult(_stats(result), _model_outputs(ctx.stage_dir), model_dir=result.model_dir)


class StudentStage:
    name = "student"

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "student": recipe.student.model_dump(mode="json")}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return _upstream(ctx, "preprocess", "teacher")

    def run(self, ctx: StageContext) -> StageResult:
        from workers.train.spec import TrainSpec
        from workers.train.stage import run_training

        section = ctx.recipe.student
        spec = TrainSpec(stage="student", run_dir=ctx.run_dir.path, train=section.train_config(),
                         init_dir=os.path.join(ctx.run_dir.stage_dir("teacher"), "model"),
                         pruning=section.pruning, distillation=section.distillation, seed=ctx.recipe.seed,
                         tracker=ctx.tracker, resource_wait_s=ctx.recipe.ray.resource_wait_s,
                         store=ctx.run_dir.store)
        result = run_training(spec)
        return StageResult(_stats(result), _model_outputs(ctx.stage_dir), model_dir=result.model_dir)
