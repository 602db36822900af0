"""Stages 2 and 3: teacher preparation (dense MLM+NSP) and student pruning (GMP + distillation).

Both run as Ray Train jobs with a DeepSpeed engine per worker (`workers/train`). Their Ray Train
storage lives in the stage directory, so rerunning the pipeline after a crash resumes from the last
good checkpoint of the unfinished stage.
"""
from __future__ import annotations

from typing import Any

from orchestrator.manifest import stage_fingerprint
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import StageContext, StageResult
from pipelines.config_keys import result_defining
from workers.stage_outputs import TrainingOutput, read_output


def upstream(ctx: StageContext, *stages: str) -> dict[str, Any]:
    """Fingerprints of the stages this one reads: a redone upstream stage makes this one stale."""
    return {s: stage_fingerprint(ctx.layout, s) for s in stages}


def _result(ctx: StageContext, stage: str, spec: Any) -> StageResult:
    from workers.train.driver import run_training

    result = run_training(spec)
    run = spec.run
    stats = {"final_step": result.final_step, "start_steps": result.start_steps,
             "train_time_s": round(result.elapsed_s, 3), **result.metrics}
    output = TrainingOutput(model=ctx.layout.rel(run.model), final_step=result.final_step,
                            sparsity=result.summary.export_sparsity,
                            metrics={k: float(v) for k, v in result.metrics.items()})
    return StageResult(stats, ctx.layout.file_hashes(stage, run.model), output, model_dir=run.model)


class TeacherStage:
    name = "teacher"

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "model": result_defining(recipe.model),
                "teacher": result_defining(recipe.teacher)}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return upstream(ctx, "preprocess")

    def run(self, ctx: StageContext) -> StageResult:
        from workers.train.spec import TrainSpec

        spec = TrainSpec(stage="teacher", layout=ctx.layout, train=ctx.recipe.teacher, model=ctx.recipe.model,
                         seed=ctx.recipe.seed, tracker=ctx.worker_tracker(self.name),
                         resource_wait_s=ctx.recipe.ray.resource_wait_s,
                         stall_timeout_s=ctx.recipe.ray.stall_timeout_s, log_dir=ctx.log_dir)
        return _result(ctx, self.name, spec)


class StudentStage:
    name = "student"

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "student": result_defining(recipe.student)}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return upstream(ctx, "preprocess", "teacher")

    def run(self, ctx: StageContext) -> StageResult:
        from workers.train.spec import TrainSpec

        section = ctx.recipe.student
        teacher = read_output(ctx.layout, "teacher", TrainingOutput)  # the student starts from its export
        spec = TrainSpec(stage="student", layout=ctx.layout, train=section.train_config(),
                         init_dir=ctx.layout.path(teacher.model), pruning=section.pruning,
                         distillation=section.distillation, seed=ctx.recipe.seed,
                         tracker=ctx.worker_tracker(self.name),
                         resource_wait_s=ctx.recipe.ray.resource_wait_s,
                         stall_timeout_s=ctx.recipe.ray.stall_timeout_s, log_dir=ctx.log_dir)
        return _result(ctx, self.name, spec)
