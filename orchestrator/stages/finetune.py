"""Stage 4: downstream fine-tuning with the sparsity pattern locked.

Per task in `finetune.tasks`: prepare the task's features once, fine-tune a dense teacher from the
prepared (dense) teacher when `finetune.distill`, then fine-tune the sparse model once per seed,
distilling from that teacher. Each run is its own Ray Train job and nested MLflow run
(`finetune/<task>/teacher`, `finetune/<task>/seed-<s>`); a finished run leaves `result.json` and
is skipped when the stage is resumed, an unfinished one continues from its last checkpoint.
"""
from __future__ import annotations

import functools
import os
import shutil
import statistics
import threading
import time
from typing import Any, Optional

from orchestrator.fingerprints import stage_fingerprint
from orchestrator.run_graph import GraphFailed, Node, RunGraph
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import Stage, StageContext, StageResult, fmt
from orchestrator.tracking.results import is_number, run_export
from pipelines.atomic import atomic_dir
from pipelines.config_keys import result_defining
from pipelines.finetune.config import FinetuneConfig, TaskConfig
from pipelines.finetune.plan import task_train_config
from workers.errors import first_line
from pipelines.finetune.tasks import get_task
from workers.console_lines import say
from workers.preemption import Preempted
from workers.run_layout import RunLayout, TrainRunLayout
from workers.run_records import AttemptRecord, read_record, read_record_lines, write_record
from workers.stage_outputs import (FinetuneOutput, FinetuneRunOutput, FinetuneTaskOutput, StageManifest, TrainingOutput,
                                   output_of, read_output)
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
    # without the seed's card: cards are rewritten after the stage, so one must never be a recorded output
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("README.md"))


def _finished(run: TrainRunLayout) -> Optional[FinetuneRunOutput]:
    if not os.path.exists(run.result):
        return None
    return read_record(FinetuneRunOutput, run.result, run.stage)


class FinetuneStage(Stage):
    name = "finetune"
    output_model = FinetuneOutput
    sections = ("finetune",)
    headline = True
    _tracking_lock = threading.Lock()

    def result(self, manifest: StageManifest, layout: RunLayout) -> str:
        out = output_of(manifest, layout, FinetuneOutput)
        parts = []
        for name, task in out.tasks.items():
            res = task_results(task)
            metric = next((k for k in HEADLINE_METRICS if k in res), None)
            if metric is not None:
                parts.append(f"{name} {metric} {fmt(res[metric], 2)} ({len(task.seeds)} seed(s))")
        return "; ".join(parts) or f"{len(out.tasks)} task(s)"

    def held(self, layout: RunLayout) -> list[str]:
        finished = sum(1 for _, _, names in os.walk(layout.stage_dir(self.name)) for n in names if n == "result.json")
        return [f"{finished} finished fine-tuning run(s)"] if finished else []

    def headline_metrics(self, manifest: StageManifest, layout: RunLayout) -> dict[str, float]:
        out: dict[str, float] = {}
        for task, finetuned in output_of(manifest, layout, FinetuneOutput).tasks.items():
            result = task_results(finetuned)
            out.update({f"finetune/{task}/{k}": float(v) for k, v in result.items() if is_number(v)})
            teacher = result.get("teacher") or {}
            out.update({f"finetune/{task}/teacher/{k}": float(v) for k, v in teacher.items() if is_number(v)})
        return out

    def export_names(self, recipe: Recipe) -> list[str]:
        return [f"finetune/{t.name}" for t in recipe.finetune.tasks] if recipe.finetune is not None else []

    def attempt_files(self, layout: RunLayout) -> list[str]:
        # every task's runs: finetune/<task>/<run>/attempts.jsonl
        return [os.path.join(root, n) for root, _, names in os.walk(layout.stage_dir(self.name))
                for n in names if n == "attempts.jsonl"]

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
        started = time.time()
        if tracking is not None:
            with self._tracking_lock:  # runs start and end from several threads
                tracking.start_stage(key, params={"task": task.name, "role": role, "seed": seed,
                                                  "init_model": init_model, "max_steps": train.max_steps,
                                                  "teacher_dir": teacher_dir or ""})
                tracker = ctx.worker_tracker(key)
        spec = FinetuneSpec(task=task, role=role, layout=ctx.layout, run_name=name, init_model=init_model, train=train,
                            seed=seed, teacher_dir=teacher_dir, lock_pattern=ft.lock_pattern,
                            qat=ft.qat and role == "student", distillation=ft.distillation, tracker=tracker,
                            resource_wait_s=ctx.recipe.ray.resource_wait_s,
                            stall_timeout_s=ctx.recipe.ray.stall_timeout_s,
                            log_dir=os.path.join(ctx.log_dir, f"{task.name}-{name}") if ctx.log_dir else None)
        try:
            result = run_finetune(spec)
        except BaseException as exc:
            if tracking is not None:
                with self._tracking_lock:
                    tracking.end_stage(key, "KILLED" if isinstance(exc, (KeyboardInterrupt, Preempted)) else "FAILED")
            raise
        attempts = read_record_lines(AttemptRecord, run.attempts, run.stage)
        record = FinetuneRunOutput(name=name, seed=seed, model=ctx.layout.rel(run.model), final_step=result.final_step,
                                   metrics=_eval_metrics(result.metrics),
                                   sparsity=result.summary.export_sparsity,
                                   quantization=result.summary.quantization,
                                   train_time_s=round(result.elapsed_s, 3), started=started, finished=time.time(),
                                   nodes=attempts[-1].nodes if attempts else [])
        write_record(record, run.result)
        ctx.run_dir.sync_up(run.root)  # a finished run is skipped on any later rerun, on any node
        if tracking is not None:
            _log_run_model(tracking, key, task.name, record, ctx)
            with self._tracking_lock:
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
        graph = self._graph(ctx, student, teacher_init, data)
        try:
            nodes = graph.run()
        except GraphFailed as exc:
            preempted = next((n.error for n in exc.failed if isinstance(n.error, Preempted)), None)
            if preempted is not None:
                raise preempted from None  # finished runs are kept; the rerun resumes the others
            raise RuntimeError(f"finetune: {exc} (the finished runs are kept: a rerun redoes only these)") from None
        for task in ft.tasks:
            teacher_record = nodes[f"{task.name}/teacher"].result if f"{task.name}/teacher" in nodes else None
            runs = {seed: nodes[f"{task.name}/seed-{seed}"].result for seed in ft.seeds}
            model_dir = ctx.layout.task_model(task.name)
            _copy_model(ctx.layout.path(runs[ft.seeds[0]].model), model_dir)
            outputs.update(ctx.layout.file_hashes(self.name, model_dir))
            tasks[task.name] = FinetuneTaskOutput(model=ctx.layout.rel(model_dir), teacher=teacher_record,
                                                  seeds={str(seed): r for seed, r in runs.items()})
            results[task.name] = task_results(tasks[task.name])
        timeline = {name: {"nodes": n.result.nodes, "started": n.result.started, "finished": n.result.finished}
                    for name, n in nodes.items()}
        return StageResult({"results": results, "data": data, "tasks": [t.name for t in ft.tasks],
                            "seeds": list(ft.seeds), "runs": timeline}, outputs, FinetuneOutput(tasks=tasks))

    def _graph(self, ctx: StageContext, student: str, teacher_init: str, data: dict[str, Any]) -> RunGraph:
        """Each task's dense teacher (unless the recipe gives one), then its seeds, which distil from it:
        every run whose inputs are ready goes to the cluster as soon as it has room."""
        import ray

        ft = _section(ctx.recipe)
        demand = {"cpus": ft.train.num_workers * ft.train.cpus_per_worker,
                  "gpus": ft.train.num_workers * ft.train.gpus_per_worker}
        capacity = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        if ctx.recipe.ray.resource_wait_s > 0:  # nodes still joining: what will be there, at least one run's worth
            capacity = {"CPU": max(capacity.get("CPU", 0.0), demand["cpus"]),
                        "GPU": max(capacity.get("GPU", 0.0), demand["gpus"])}
        graph = RunGraph(capacity, ft.max_concurrent_runs, on_event=_announce)
        for task in ft.tasks:
            n_train = int(data[task.name][get_task(task.name).train_split]["features"])
            teacher_node: Optional[Node] = None
            if ft.distill and not task.teacher:
                teacher_node = graph.add(Node(f"{task.name}/teacher", functools.partial(
                    self._run_one, ctx, task, "teacher", teacher_init, ctx.recipe.seed, None, n_train), **demand))
            for seed in ft.seeds:
                graph.add(Node(f"{task.name}/seed-{seed}", functools.partial(
                    self._run_seed, ctx, task, seed, student, teacher_node, n_train),
                    needs=(teacher_node.name,) if teacher_node else (), **demand))
        return graph

    def _run_seed(self, ctx: StageContext, task: TaskConfig, seed: int, student: str, teacher: Optional[Node],
                  n_train: int) -> FinetuneRunOutput:
        ft = _section(ctx.recipe)
        if not ft.distill:
            teacher_dir = None
        elif task.teacher:
            teacher_dir = task.teacher  # already fine-tuned on the task: distil from it as is
        else:
            teacher_dir = ctx.layout.path(teacher.result.model)  # type: ignore[union-attr]
        return self._run_one(ctx, task, f"seed-{seed}", student, seed, teacher_dir, n_train)


def _log_run_model(tracking: Any, key: str, task: str, record: FinetuneRunOutput, ctx: StageContext) -> None:
    """The run's export as an MLflow model in its own run, with its results; the first seed's is the task's
    export (`finetune/<task>/model`), registered where `tracking.register_models` names it. A tracking
    problem only warns (the model is safe on disk)."""
    export = run_export(task, record, ctx.layout)
    first_seed = record.name == f"seed-{_section(ctx.recipe).seeds[0]}"
    registered = tracking.config.register_models.get(f"finetune/{task}") if first_seed else None
    try:
        tracking.log_model(export.folder, key=key, name=key.replace("/", "-"), task=export.task,
                           registered_model_name=registered, metrics=export.metrics, params=export.params,
                           step=export.step)
    except Exception as exc:  # noqa: BLE001 - see docstring
        say(f"[finetune] {key}: warning: could not log its model to MLflow: {exc}")


def _announce(event: str, node: Node, counts: dict[str, int]) -> None:
    """One console line per run that starts or ends, with where the stage stands."""
    detail = ""
    if event == "failed":
        detail = f": {first_line(node.error, 200)}"
    elif event == "skipped":
        detail = f": {node.skipped}"
    elif event == "finished" and node.started is not None and node.finished is not None:
        detail = f" in {node.finished - node.started:.0f}s" + _headline(node.result)
    say(f"[finetune] {node.name} {event}{detail} ({counts['running']} running, {counts['done']}/{counts['total']} "
        "done)")


HEADLINE_METRICS = ("accuracy", "f1", "exact_match", "m_accuracy", "mcc")  # the first a task reports is its headline


def _headline(result: Any) -> str:
    """`: accuracy 70.00` for a finished run's record; "" for anything else."""
    metrics = getattr(result, "metrics", None) or {}
    name = next((m for m in HEADLINE_METRICS if m in metrics), None)
    return f": {name} {metrics[name]:.2f}" if name else ""


def _export(ctx: StageContext, stage: str) -> str:
    """The model a finished teacher or student stage exported (named by its output record)."""
    return ctx.layout.path(read_output(ctx.layout, stage, TrainingOutput).model)
