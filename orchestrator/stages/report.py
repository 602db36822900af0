"""The last stage: a model-card style Markdown report of the run, `<run>/report/README.md`."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Iterable, Mapping, Optional

from orchestrator.console import format_duration
from orchestrator.fingerprints import stage_fingerprint
from orchestrator.recipe.load import dump_recipe
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import Stage, StageContext, StageResult
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
                  inference: Optional[Mapping[str, Any]] = None,
                  plots: Optional[Mapping[str, list[str]]] = None) -> str:
    """The report's Markdown; `plots`: the training charts copied beside it (training_plots)."""
    plots = plots or {}
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
        out += ["## Data", "", _table(["statistic", "value"], [[k, pre.get(k)] for k in keys]), ""]
        skipped = pre.get("documents_skipped") or {}
        out += (["Documents skipped, by reason:", "", _table(["reason", "documents"], sorted(map(list, skipped.items()))),
                 ""] if skipped else ["No document was skipped.", ""])
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
    out += _training_plots(plots)
    out += render_inference(inference)
    times = [[s, format_duration(m.wall_time_s)] for s, m in manifests.items()]
    total = format_duration(sum(m.wall_time_s for m in manifests.values()))
    out += ["## Wall time", "", _table(["stage", "time"], times + [["**total**", f"**{total}**"]]), ""]
    if models:
        out += ["## Exported models", "", _table(["stage", "Hugging Face folder"],
                                                 [[s, _link(layout, m)] for s, m in models.items()]),
                "", "Each folder holds its model card (`README.md`). To load the sparse model:", "",
                "```python", _load_snippet(layout, models), "```", ""]
    out += ["## Recipe", "", f"The whole recipe is [{RECIPE}](../{RECIPE}) (every key, defaults included).", "",
            "<details><summary>recipe</summary>", "", "```yaml", dump_recipe(recipe).rstrip(), "```", "",
            "</details>", ""]
    return "\n".join(out)


RECIPE = "recipe.yaml"  # RunLayout.recipe, relative to the run


def _load_snippet(layout: RunLayout, models: Mapping[str, str]) -> str:
    stage = "student" if "student" in models else next(iter(models))
    rel = layout.rel(models[stage])
    return "\n".join(["from transformers import AutoModelForPreTraining, AutoTokenizer",
                      "",
                      f'model = AutoModelForPreTraining.from_pretrained("{rel}")  # from the run folder',
                      f'tokenizer = AutoTokenizer.from_pretrained("{rel}")'])


def _training_plots(plots: Mapping[str, list[str]]) -> list[str]:
    """The loss and sparsity-schedule charts the training stages drew, copied beside the README."""
    if not plots:
        return []
    out = ["## Training curves", ""]
    for stage, names in plots.items():
        out += [f"![{stage} {name.removeprefix(stage + '-').removesuffix('.png')}]({name})" for name in names] + [""]
    return out


def training_plots(layout: RunLayout, stages: Iterable[str]) -> dict[str, list[str]]:
    """stage -> the report's names (`<stage>-loss.png`, ...) of the charts its plots folder holds."""
    found: dict[str, list[str]] = {}
    for stage in stages:
        folder = layout.plots(stage)
        if os.path.isdir(folder):
            names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
            if names:
                found[stage] = [f"{stage}-{n}" for n in names]
    return found


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


class ReportStage(Stage):
    name = "report"
    output_model = ReportOutput
    needs_ray = False
    rebuilt_freely = True  # holds no training progress: redone whenever its inputs change, never refused

    def result(self, manifest: StageManifest, layout: RunLayout) -> str:
        return "report written"

    def outputs_path(self, manifest: StageManifest, layout: RunLayout) -> Optional[str]:
        return layout.report

    def progress(self, layout: RunLayout, recipe: Recipe) -> Optional[str]:
        return None  # rebuilt whole from the other stages' outputs

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"recipe": result_defining(recipe)}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return {s: stage_fingerprint(ctx.layout, s) for s in UPSTREAM}

    def run(self, ctx: StageContext) -> StageResult:
        layout = ctx.layout
        manifests = {s: m for s in UPSTREAM if (m := load_manifest(layout, s))}
        path = layout.report
        inference = run_inference(ctx.recipe, layout, manifests, ctx.tracker)  # report/inference.json
        plots = training_plots(layout, [s for s in ("teacher", "student") if s in manifests])
        report_dir = os.path.dirname(path)
        os.makedirs(report_dir, exist_ok=True)
        for stage, names in plots.items():
            for name in names:
                shutil.copyfile(os.path.join(layout.plots(stage), name.removeprefix(stage + "-")),
                                os.path.join(report_dir, name))
        write_text_atomic(render_report(ctx.recipe, layout, manifests, inference, plots), path)
        from orchestrator.model_card.records import RunRecords
        from orchestrator.model_card.write import write_run_cards

        # every export's card again, now with the downstream results and the inference figures
        cards = write_run_cards(RunRecords.read(layout, ctx.recipe, manifests))
        student = _models(layout, manifests).get("student")
        png = report_paths(student)[1] if student else None
        if png is not None and png.exists():  # the per-layer chart the README shows
            shutil.copyfile(png, os.path.join(report_dir, png.name))
        for name in sorted(os.listdir(report_dir)):  # the README and every image it shows, so it renders in MLflow
            if name == os.path.basename(path) or name.endswith(".png"):
                ctx.tracker.log_artifact(os.path.join(report_dir, name), "report")
        outputs = layout.file_hashes(self.name, os.path.dirname(path))
        stats: dict[str, Any] = {"stages_reported": sorted(manifests), "model_cards": len(cards)}
        if inference is not None:
            stats["inference_models"] = len(inference["models"])
            stats["inference_not_measured"] = sum(1 for r in inference["models"] if r["error"])
        return StageResult(stats, outputs, ReportOutput(stages_reported=sorted(manifests)))
