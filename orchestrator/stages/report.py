"""The last stage: a model-card style Markdown report of the run, `<run>/report/README.md`."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Mapping, Optional

from orchestrator.manifest import stage_fingerprint
from orchestrator.recipe.load import dump_recipe
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import StageContext, StageResult
from orchestrator.stages.inference_section import render_inference, run_inference
from orchestrator.stages.results_table import results_table, seed_table
from pipelines.atomic import write_text_atomic
from pipelines.config_keys import result_defining
from pipelines.sparsity.report_files import report_paths
from workers.run_layout import RunLayout
from workers.stage_outputs import (FinetuneOutput, ReportOutput, StageManifest, TrainingOutput, load_manifest,
                                   output_of)

UPSTREAM = ("preprocess", "teacher", "student", "finetune")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "–" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _link(layout: RunLayout, path: str) -> str:
    """A link from `report/README.md` to `path` inside the run, relative: it resolves wherever the run folder is."""
    rel = layout.rel(path)
    return f"[{rel}](../{rel})"


def _models(layout: RunLayout, manifests: Mapping[str, StageManifest]) -> dict[str, str]:
    """stage -> its exported model folder, from the training stages' output records."""
    return {s: layout.path(output_of(manifests[s], layout, TrainingOutput).model)
            for s in ("teacher", "student") if s in manifests}


def _sparsity(models: Mapping[str, str]) -> Optional[dict[str, Any]]:
    if "student" not in models:
        return None
    path, _ = report_paths(models["student"])
    if not path.exists():
        return None
    return json.loads(path.read_text())


def render_report(recipe: Recipe, layout: RunLayout, manifests: Mapping[str, StageManifest],
                  inference: Optional[Mapping[str, Any]] = None) -> str:
    out = [f"# pofa run `{recipe.name}`", "", recipe.description or "", ""]
    models = _models(layout, manifests)
    sp = _sparsity(models)
    if "student" in models:
        target = recipe.student.pruning.schedule.final_sparsity if recipe.student else None
        out += [f"Sparse model: {_link(layout, models['student'])} "
                f"(global sparsity {_fmt(sp['global_sparsity']) if sp else '–'}, target {_fmt(target)}).", ""]
    pre = manifests["preprocess"].stats if "preprocess" in manifests else None
    if pre:
        keys = ["documents_train", "documents_validation", "sentences", "instances_train", "instances_validation",
                "tokens", "short_seq_fraction", "nsp_random_fraction", "masked_token_fraction", "max_seq_length"]
        out += ["## Data", "", _table(["statistic", "value"], [[k, pre.get(k)] for k in keys]), "",
                f"Skipped documents: {json.dumps(pre.get('documents_skipped', {}))}", ""]
    if models:
        cols = ["val/loss", "val/mlm_acc", "val/nsp_acc", "sparsity/global"]
        trained = {s: output_of(manifests[s], layout, TrainingOutput) for s in models}
        out += ["## Validation", "", _table(["model", *cols, "final_step"],
                                            [[s, *[t.metrics.get(c) for c in cols], t.final_step]
                                             for s, t in trained.items()]), ""]
    out += _downstream(recipe, layout, manifests)
    if sp:
        out += ["## Sparsity per layer", "", "![sparsity per layer](sparsity.png)", "",
                _table(["layer", "shape", "sparsity"], [[l["name"], "×".join(map(str, l["shape"])), l["sparsity"]]
                                                          for l in sp["layers"]]), ""]
    out += render_inference(inference)
    out += ["## Wall time", "", _table(["stage", "seconds"], [[s, m.wall_time_s] for s, m in manifests.items()]), ""]
    if models:
        out += ["## Exported models", "", _table(["stage", "Hugging Face folder"],
                                                 [[s, _link(layout, m)] for s, m in models.items()]),
                ""]
    out += ["## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(out)


def _downstream(recipe: Recipe, layout: RunLayout, manifests: Mapping[str, StageManifest]) -> list[str]:
    if "finetune" not in manifests:
        return []
    from orchestrator.stages.finetune import task_results

    finetuned = output_of(manifests["finetune"], layout, FinetuneOutput)
    results = {name: task_results(task) for name, task in finetuned.tasks.items()}
    if not results:
        return []
    from pipelines.finetune.published import PUBLISHED, SOURCE

    published = PUBLISHED.get(recipe.name)
    seeds = len(recipe.finetune.seeds) if recipe.finetune else 1
    out = ["## Downstream (pattern locked)", "", results_table(results, recipe.name, published, seeds), ""]
    if published:
        out += [f"Published figures: {SOURCE}", ""]
    out += ["Per seed (the export's global sparsity beside it):", "", seed_table(results), "",
            "Every run (runs of the stage train side by side when the cluster has room):", "",
            _runs_table(finetuned), "",
            "Fine-tuned models: " + ", ".join(_link(layout, layout.path(t.model)) for t in finetuned.tasks.values()),
            ""]
    return out


def _runs_table(finetuned: FinetuneOutput) -> str:
    rows = []
    for task, out in finetuned.tasks.items():
        for run in ([out.teacher] if out.teacher else []) + list(out.seeds.values()):
            start = time.strftime("%H:%M:%S", time.localtime(run.started)) if run.started else None
            end = time.strftime("%H:%M:%S", time.localtime(run.finished)) if run.finished else None
            metric = ", ".join(f"{k}={v:.2f}" for k, v in sorted(run.metrics.items()))
            rows.append([f"{task}/{run.name}", ", ".join(n[:8] for n in run.nodes) or None, start, end,
                         run.train_time_s, metric])
    return _table(["run", "nodes", "started", "finished", "seconds", "result"], rows)


class ReportStage:
    name = "report"
    needs_ray = False
    rebuilt_freely = True  # holds no training progress: redone whenever its inputs change, never refused

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"recipe": result_defining(recipe)}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return {s: stage_fingerprint(ctx.layout, s) for s in UPSTREAM}

    def run(self, ctx: StageContext) -> StageResult:
        layout = ctx.layout
        manifests = {s: m for s in UPSTREAM if (m := load_manifest(layout, s))}
        path = layout.report
        inference = run_inference(ctx.recipe, layout, manifests, ctx.tracker)  # report/inference.json
        write_text_atomic(render_report(ctx.recipe, layout, manifests, inference), path)
        from orchestrator.model_card.records import RunRecords
        from orchestrator.model_card.write import write_run_cards

        # every export's card again, now with the downstream results and the inference figures
        cards = write_run_cards(RunRecords.read(layout, ctx.recipe, manifests))
        student = _models(layout, manifests).get("student")
        png = report_paths(student)[1] if student else None
        if png is not None and png.exists():  # the per-layer chart the README shows
            shutil.copyfile(png, os.path.join(os.path.dirname(path), png.name))
        ctx.tracker.log_artifact(path, "report")
        outputs = layout.file_hashes(self.name, os.path.dirname(path))
        stats: dict[str, Any] = {"stages_reported": sorted(manifests), "model_cards": len(cards)}
        if inference is not None:
            stats["inference_models"] = len(inference["models"])
            stats["inference_not_measured"] = sum(1 for r in inference["models"] if r["error"])
        return StageResult(stats, outputs, ReportOutput(stages_reported=sorted(manifests)))
