"""Stage 4: downstream fine-tuning with the sparsity pattern locked.

Per task in `finetune.tasks`: prepare the task's features once, fine-tune a dense teacher from the
prepared (dense) teacher when `finetune.distill`, then fine-tune the sparse model once per seed,
distilling from that teacher. Each run is its own Ray Train job and nested MLflow run
(`finetune/<task>/teacher`, `finetune/<task>/seed-<s>`); a finished run leaves `result.json` and
is skipped when the stage is resumed, an unfinished one continues from its last checkpoint.
"""
from __future__ import annotations

import os
import shutil
import statistics
from typing import Any, Optional

from orchestrator.manifest import stage_fingerprint
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import StageContext, StageResult
from pipelines.atomic import atomic_dir, write_json_atomic
from pipelines.config_keys import result_defining
from pipelines.finetune.config import FinetuneConfig, TaskConfig
from pipelines.finetune.plan import task_train_config
from pipelines.finetune.tasks import get_task
from workers.run_layout import TrainRunLayout
from workers.stage_outputs import FinetuneOutput, FinetuneRunOutput, FinetuneTaskOutput, TrainingOutput, read_output
from workers.tracking import NullTracker


def _section(recipe: Recipe) -> FinetuneConfig:
    assert recipe.finetune is not None  # the schema requires it when the stage is selected
    return recipe.finetune


def _eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """task metric -> mean over seeds, plus every seed's values."""
    metrics = sorted({k for m in per_seed.values() for k in m})
    out: dict[str, Any] = {k: statistics.fmean(m[k] for m in per_seed.values() if k in m) for k in metrics}
    out["seeds"] = {str(s): m for s, m in per_seed.items()}
    return out


def task_results(task: FinetuneTaskOutput) -> dict[str, Any]:
    """A task's table row: metric -> mean over seeds, every seed's values (`seeds`), the export's
    sparsity per seed, the int8 report per seed (QAT), and the dense task teacher's metrics."""
    summary = aggregate({int(seed): r.metrics for seed, r in task.seeds.items()})
    summary["sparsity"] = {seed: r.sparsity for seed, r in task.seeds.items()}
    if any(r.quantization for r in task.seeds.values()):
        summary["quantization"] = {seed: r.quantization for seed, r in task.seeds.items()}
    if task.teacher is not None:
        summary["teacher"] = task.teacher.metrics
    return summary


def _copy_model(src: str, dst: str) -> None:
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


def _finished(run: TrainRunLayout) -> Optional[FinetuneRunOutput]:
    if not os.path.exists(run.result):
        return None
    with open(run.result) as f:
        return FinetuneRunOutput.model_validate_json(f.read())


class FinetuneStage:
    name = "finetune"

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "finetune": result_defining(_section(recipe))}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        ft = _section(ctx.recipe)
        upstream = []
        if ft.model is None:
            upstream.append("student")
        if ft.distill and ft.teacher_model is None and any(t.teacher is None for t in ft.tasks):
            upstream.append("teacher")
        return {s: stage_fingerprint(ctx.layout, s) for s in upstream}

    def _models(self, ctx: StageContext) -> tuple[str, str]:
        """The sparse model to fine-tune and the dense model task teachers start from: the recipe's,
        else this run's student and teacher exports (from their output records)."""
        ft = _section(ctx.recipe)
        student = ft.model or _export(ctx, "student")
        needs_teacher = ft.distill and any(t.teacher is None for t in ft.tasks)
        teacher = ft.teacher_model or (_export(ctx, "teacher") if needs_teacher else "")
        return student, teacher

    def _run_one(self, ctx: StageContext, task: TaskConfig, name: str, init_model: str, seed: int,
                 teacher_dir: Optional[str], train_features: int) -> FinetuneRunOutput:
        """One Ray Train run (teacher or a student seed), skipped when its result is on disk."""
        from workers.finetune.run import run_finetune
        from workers.finetune.spec import FinetuneSpec

        ft = _section(ctx.recipe)
        run = ctx.layout.finetune_run(task.name, name)
        done = _finished(run)
        if done is not None:
            return done
        role = "teacher" if name == "teacher" else "student"
        train = task_train_config(ft.train, task, train_features, role)
        key = run.name
        tracking = ctx.tracking
        tracker = NullTracker()
        if tracking is not None:
            tracking.start_stage(key, params={"task": task.name, "role": role, "seed": seed, "init_model": init_model,
                                              "max_steps": train.max_steps, "teacher_dir": teacher_dir or ""})
            tracker = ctx.worker_tracker(key)
        spec = FinetuneSpec(task=task, role=role, layout=ctx.layout, run_name=name, init_model=init_model, train=train,
                            seed=seed, teacher_dir=teacher_dir, lock_pattern=ft.lock_pattern,
                            qat=ft.qat and role == "student", distillation=ft.distillation, tracker=tracker,
                            resource_wait_s=ctx.recipe.ray.resource_wait_s)
        try:
            result = run_finetune(spec)
        except BaseException as exc:
            if tracking is not None:
                tracking.end_stage(key, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        record = FinetuneRunOutput(name=name, seed=seed, model=ctx.layout.rel(run.model), final_step=result.final_step,
                                   metrics=_eval_metrics(result.metrics),
                                   sparsity=result.summary.get("export_sparsity"),
                                   quantization=result.summary.get("quantization"),
                                   train_time_s=round(result.elapsed_s, 3))
        write_json_atomic(record.model_dump(mode="json"), run.result)
        ctx.run_dir.sync_up(run.root)  # a finished run is skipped on any later rerun, on any node
        if tracking is not None:
            tracking.end_stage(key, "FINISHED")
        return record

    def run(self, ctx: StageContext) -> StageResult:
        from workers.finetune.prepare import prepare_task

        ft = _section(ctx.recipe)
        student, teacher_init = self._models(ctx)
        for what, path, stage in (("model", student, "student"), ("teacher_model", teacher_init, "teacher")):
            local = os.path.isabs(path) or path.startswith(".")
            if local and not os.path.isdir(path):
                raise ValueError(f"finetune.{what}: {path} does not exist; run the {stage} stage first or set "
                                 f"finetune.{what} to a model folder or hub name")
        results: dict[str, Any] = {}
        data: dict[str, Any] = {}
        tasks: dict[str, FinetuneTaskOutput] = {}
        outputs: dict[str, str] = {}
        # every task's data is loaded, checked and encoded before the first run trains: a bad
        # column in the last task must not surface hours into the first
        for task in ft.tasks:
            prepared = ctx.layout.task_data(task.name)
            data[task.name] = prepare_task(task, student, prepared)
            ctx.run_dir.sync_up(prepared.root)  # the workers, on any node, read it from there
        for task in ft.tasks:
            n_train = int(data[task.name][get_task(task.name).train_split]["features"])
            teacher_dir = None
            teacher_record = None
            if ft.distill and task.teacher:
                teacher_dir = task.teacher  # already fine-tuned on the task: distil from it as is
            elif ft.distill:
                teacher_record = self._run_one(ctx, task, "teacher", teacher_init, ctx.recipe.seed, None, n_train)
                teacher_dir = ctx.layout.path(teacher_record.model)
            runs = {seed: self._run_one(ctx, task, f"seed-{seed}", student, seed, teacher_dir, n_train)
                    for seed in ft.seeds}
            model_dir = ctx.layout.task_model(task.name)
            _copy_model(ctx.layout.path(runs[ft.seeds[0]].model), model_dir)
            outputs.update(ctx.layout.file_hashes(self.name, model_dir))
            tasks[task.name] = FinetuneTaskOutput(model=ctx.layout.rel(model_dir), teacher=teacher_record,
                                                  seeds={str(seed): r for seed, r in runs.items()})
            results[task.name] = task_results(tasks[task.name])
        return StageResult({"results": results, "data": data, "tasks": [t.name for t in ft.tasks],
                            "seeds": list(ft.seeds)}, outputs, FinetuneOutput(tasks=tasks))


def _export(ctx: StageContext, stage: str) -> str:
    """The model a finished teacher or student stage exported (named by its output record)."""
    return ctx.layout.path(read_output(ctx.layout, stage, TrainingOutput).model)
