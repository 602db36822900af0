"""Stage 4: downstream fine-tuning with the sparsity pattern locked.

Per task in `finetune.tasks`: prepare the task's features once, fine-tune a dense teacher from the
prepared (dense) teacher when `finetune.distill`, then fine-tune the sparse model once per seed,
distilling from that teacher. Each run is its own Ray Train job and nested MLflow run
(`finetune/<task>/teacher`, `finetune/<task>/seed-<s>`); a finished run leaves `result.json` and
is skipped when the stage is resumed, an unfinished one continues from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
from typing import Any, Optional

from orchestrator.manifest import read_manifest
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import StageContext, StageResult
from pipelines.atomic import file_sha256, write_json_atomic
from pipelines.finetune.config import FinetuneConfig, TaskConfig
from pipelines.finetune.plan import task_train_config
from pipelines.finetune.tasks import get_task
from workers.tracking import NullTracker

RESULT = "result.json"


def _section(recipe: Recipe) -> FinetuneConfig:
    assert recipe.finetune is not None  # the schema requires it when the stage is selected
    return recipe.finetune


def _read_json(path: str) -> Optional[dict[str, Any]]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _eval_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}


def aggregate(per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """task metric -> mean over seeds, plus every seed's values."""
    metrics = sorted({k for m in per_seed.values() for k in m})
    out: dict[str, Any] = {k: statistics.fmean(m[k] for m in per_seed.values() if k in m) for k in metrics}
    out["seeds"] = {str(s): m for s, m in per_seed.items()}
    return out


def _copy_model(src: str, dst: str) -> None:
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


class FinetuneStage:
    name = "finetune"

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"seed": recipe.seed, "finetune": _section(recipe).model_dump(mode="json")}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        ft = _section(ctx.recipe)
        upstream = []
        if ft.model is None:
            upstream.append("student")
        if ft.distill and ft.teacher_model is None and any(t.teacher is None for t in ft.tasks):
            upstream.append("teacher")
        return {s: (read_manifest(ctx.run_dir.stage_dir(s)) or {}).get("fingerprint") for s in upstream}

    def _models(self, ctx: StageContext) -> tuple[str, str]:
        ft = _section(ctx.recipe)
        student = ft.model or os.path.join(ctx.run_dir.stage_dir("student"), "model")
        teacher = ft.teacher_model or os.path.join(ctx.run_dir.stage_dir("teacher"), "model")
        return student, teacher

    def _run_one(self, ctx: StageContext, task: TaskConfig, name: str, init_model: str, seed: int,
                 teacher_dir: Optional[str], train_features: int) -> dict[str, Any]:
        """One Ray Train run (teacher or a student seed), skipped when its result is on disk."""
        from workers.finetune.run import run_finetune
        from workers.finetune.spec import FinetuneSpec

        ft = _section(ctx.recipe)
        task_dir = os.path.join(ctx.stage_dir, task.name)
        work_dir = os.path.join(task_dir, name)
        done = _read_json(os.path.join(work_dir, RESULT))
        if done is not None:
            return done
        role = "teacher" if name == "teacher" else "student"
        train = task_train_config(ft.train, task, train_features, role)
        key = f"finetune/{task.name}/{name}"
        tracking = ctx.tracking
        tracker = NullTracker()
        if tracking is not None:
            tracking.start_stage(key, params={"task": task.name, "role": role, "seed": seed, "init_model": init_model,
                                              "max_steps": train.max_steps, "teacher_dir": teacher_dir or ""})
            tracker = tracking.tracker(key)
        spec = FinetuneSpec(task=task, role=role, work_dir=work_dir, data_dir=os.path.join(task_dir, "data"),
                            init_model=init_model, train=train, seed=seed, teacher_dir=teacher_dir,
                            lock_pattern=ft.lock_pattern, qat=ft.qat and role == "student",
                            distillation=ft.distillation, tracker=tracker,
                            resource_wait_s=ctx.recipe.ray.resource_wait_s, store=ctx.run_dir.store)
        try:
            result = run_finetune(spec)
        except BaseException as exc:
            if tracking is not None:
                tracking.end_stage(key, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        summary = _read_json(spec.summary_path) or {}
        record = {"name": name, "seed": seed, "final_step": result.final_step, "metrics": _eval_metrics(result.metrics),
                  "sparsity": summary.get("export_sparsity"), "quantization": summary.get("quantization"),
                  "model_dir": spec.model_dir,
                  "train_time_s": round(result.elapsed_s, 3)}
        write_json_atomic(record, os.path.join(work_dir, RESULT))
        ctx.run_dir.sync_up(f"{self.name}/{task.name}")  # a finished run is skipped on any later rerun
        if tracking is not None:
            tracking.end_stage(key, "FINISHED")
        return record

    def run(self, ctx: StageContext) -> StageResult:
        from workers.finetune.prepare import prepare_task

        ft = _section(ctx.recipe)
        student, teacher_init = self._models(ctx)
        needs_teacher = ft.distill and any(t.teacher is None for t in ft.tasks)
        for what, path, stage in (("model", student, "student"), ("teacher_model", teacher_init, "teacher")):
            local = os.path.isabs(path) or path.startswith(".")
            if (what == "model" or needs_teacher) and local and not os.path.isdir(path):
                raise ValueError(f"finetune.{what}: {path} does not exist; run the {stage} stage first or set "
                                 f"finetune.{what} to a model folder or hub name")
        results: dict[str, Any] = {}
        data: dict[str, Any] = {}
        outputs: dict[str, str] = {}
        # every task's data is loaded, checked and encoded before the first run trains: a bad
        # column in the last task must not surface hours into the first
        for task in ft.tasks:
            data[task.name] = prepare_task(task, student, os.path.join(ctx.stage_dir, task.name, "data"))
            ctx.run_dir.sync_up(f"{self.name}/{task.name}/data")  # the workers, on any node, read it from there
        for task in ft.tasks:
            task_dir = os.path.join(ctx.stage_dir, task.name)
            n_train = int(data[task.name][get_task(task.name).train_split]["features"])
            teacher_dir = None
            teacher_record = None
            if ft.distill and task.teacher:
                teacher_dir = task.teacher  # already fine-tuned on the task: distil from it as is
            elif ft.distill:
                teacher_record = self._run_one(ctx, task, "teacher", teacher_init, ctx.recipe.seed, None, n_train)
                teacher_dir = teacher_record["model_dir"]
            runs = {seed: self._run_one(ctx, task, f"seed-{seed}", student, seed, teacher_dir, n_train)
                    for seed in ft.seeds}
            summary = aggregate({seed: r["metrics"] for seed, r in runs.items()})
            summary["sparsity"] = {str(seed): r["sparsity"] for seed, r in runs.items()}
            if any(r.get("quantization") for r in runs.values()):
                summary["quantization"] = {str(seed): r["quantization"] for seed, r in runs.items()}
            if teacher_record is not None:
                summary["teacher"] = teacher_record["metrics"]
            results[task.name] = summary
            model_dir = os.path.join(task_dir, "model")
            _copy_model(runs[ft.seeds[0]]["model_dir"], model_dir)
            for fname in sorted(os.listdir(model_dir)):
                path = os.path.join(model_dir, fname)
                if os.path.isfile(path):
                    outputs[f"{task.name}/model/{fname}"] = file_sha256(path)
        return StageResult({"results": results, "data": data, "tasks": [t.name for t in ft.tasks],
                            "seeds": list(ft.seeds)}, outputs)
