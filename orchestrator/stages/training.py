"""Stages 2 and 3: teacher preparation (dense MLM+NSP) and student pruning (GMP + distillation).

Both run as Ray Train jobs with a DeepSpeed engine per worker (`workers/train`). Their Ray Train
storage lives in the stage directory, so rerunning the pipeline after a crash resumes from the last
good checkpoint of the unfinished stage.
"""
from __future__ import annotations

from typing import Any, Optional

from orchestrator.fingerprints import stage_fingerprint
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import Stage, StageContext, StageResult, fmt
from orchestrator.tracking.results import VALIDATION, Export
from pipelines.config_keys import result_defining
from workers.run_layout import RunLayout
from workers.stage_outputs import StageManifest, TrainingOutput, output_of, read_output


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


def committed_checkpoints(layout: RunLayout, stage: str) -> list[tuple[int, str]]:
    """(step, folder relative to the run directory) of the stage's committed checkpoints, newest first."""
    from workers.train.checkpointer import committed_checkpoints as committed

    return committed(layout, layout.training(stage))


class TrainingStage(Stage):
    """A Ray Train run with checkpoints: resumable at a step, its model the stage's export."""

    headline = True
    logs_stats_at_end = False  # the training loop logs every step
    reads_pretraining_data = True

    def result(self, manifest: StageManifest, layout: RunLayout) -> str:
        out = output_of(manifest, layout, TrainingOutput)
        m = out.metrics
        return f"step {out.final_step}: val/mlm_acc {fmt(m.get('val/mlm_acc'))}, val/nsp_acc {fmt(m.get('val/nsp_acc'))}"

    def outputs_path(self, manifest: StageManifest, layout: RunLayout) -> Optional[str]:
        try:
            return layout.path(output_of(manifest, layout, TrainingOutput).model)
        except (ValueError, KeyError):
            return None

    def live_total(self, recipe: Recipe) -> int:
        return getattr(recipe, self.name).max_steps

    def held(self, layout: RunLayout) -> list[str]:
        found = committed_checkpoints(layout, self.name)
        return [f"{len(found)} committed checkpoint(s) (newest at step {found[0][0]})"] if found else []

    def progress(self, layout: RunLayout, recipe: Recipe) -> Optional[str]:
        found = committed_checkpoints(layout, self.name)
        if not found:
            return None
        return f"at step {found[0][0]} of {self.live_total(recipe)} (checkpoint {found[0][1]})"

    def resume_point(self, layout: RunLayout) -> str:
        found = committed_checkpoints(layout, self.name)
        if found:
            return f"resuming from step {found[0][0]} (checkpoint {found[0][1]})"
        return "resuming its unfinished attempt (no checkpoint yet)"

    def attempt_files(self, layout: RunLayout) -> list[str]:
        return [layout.training(self.name).attempts]

    def headline_metrics(self, manifest: StageManifest, layout: RunLayout) -> dict[str, float]:
        trained = output_of(manifest, layout, TrainingOutput)
        return {f"{self.name}/{k}": float(v) for k, v in trained.metrics.items() if k in VALIDATION}

    def export_names(self, recipe: Recipe) -> list[str]:
        return [self.name]

    def exports(self, manifest: StageManifest, layout: RunLayout) -> list[Export]:
        """Its fill-mask model, with its validation results (and sparsity) at its last step."""
        trained = output_of(manifest, layout, TrainingOutput)
        metrics = {k: float(v) for k, v in trained.metrics.items() if k.startswith(("val/", "sparsity/global"))}
        if trained.sparsity is not None:
            metrics["sparsity"] = float(trained.sparsity)
        return [Export(self.name, layout.path(trained.model), "fill-mask", metrics, dict(manifest.config),
                       trained.final_step)]


class TeacherStage(TrainingStage):
    name = "teacher"
    output_model = TrainingOutput
    sections = ("model", "teacher")

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


class StudentStage(TrainingStage):
    name = "student"
    output_model = TrainingOutput
    sections = ("student",)

    def result(self, manifest: StageManifest, layout: RunLayout) -> str:
        out = output_of(manifest, layout, TrainingOutput)
        sparsity = out.sparsity if out.sparsity is not None else out.metrics.get("sparsity/global")
        return super().result(manifest, layout) + f", sparsity {fmt(sparsity, 3)}"

    def headline_metrics(self, manifest: StageManifest, layout: RunLayout) -> dict[str, float]:
        out = super().headline_metrics(manifest, layout)
        trained = output_of(manifest, layout, TrainingOutput)
        sparsity = trained.sparsity if trained.sparsity is not None else trained.metrics.get("sparsity/global")
        if sparsity is not None:
            out["student/sparsity"] = float(sparsity)
        return out

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
