"""The last stage: a model-card style Markdown report of the run, `<run>/report/README.md`."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

from orchestrator.manifest import read_manifest
from orchestrator.recipe.load import dump_recipe
from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import StageContext, StageResult
from orchestrator.stages.results_table import results_table, seed_table
from pipelines.atomic import file_sha256, write_text_atomic

UPSTREAM = ("preprocess", "teacher", "student", "finetune")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "–" if v is None else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sparsity(run_path: str) -> Optional[dict[str, Any]]:
    path = os.path.join(run_path, "student", "model", "sparsity.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def render_report(recipe: Recipe, run_path: str, manifests: dict[str, dict]) -> str:
    out = [f"# pofa run `{recipe.name}`", "", recipe.description or "", ""]
    if "student" in manifests:
        sp = _sparsity(run_path)
        target = recipe.student.pruning.schedule.final_sparsity if recipe.student else None
        out += [f"Sparse model: `{os.path.join(run_path, 'student', 'model')}` "
                f"(global sparsity {_fmt(sp['global_sparsity']) if sp else '–'}, target {_fmt(target)}).", ""]
    pre = manifests.get("preprocess", {}).get("stats")
    if pre:
        keys = ["documents_train", "documents_validation", "sentences", "instances_train", "instances_validation",
                "tokens", "short_seq_fraction", "nsp_random_fraction", "masked_token_fraction", "max_seq_length"]
        out += ["## Data", "", _table(["statistic", "value"], [[k, pre.get(k)] for k in keys]), "",
                f"Skipped documents: {json.dumps(pre.get('documents_skipped', {}))}", ""]
    trained = [s for s in ("teacher", "student") if s in manifests]
    if trained:
        cols = ["val/loss", "val/mlm_acc", "val/nsp_acc", "sparsity/global", "final_step"]
        out += ["## Validation", "", _table(["model", *cols],
                                            [[s, *[manifests[s]["stats"].get(c) for c in cols]] for s in trained]), ""]
    out += _downstream(recipe, run_path, manifests)
    sp = _sparsity(run_path)
    if sp:
        out += ["## Sparsity per layer", "", "![sparsity per layer](sparsity.png)", "",
                _table(["layer", "shape", "sparsity"], [[l["name"], "×".join(map(str, l["shape"])), l["sparsity"]]
                                                          for l in sp["layers"]]), ""]
    out += ["## Wall time", "", _table(["stage", "seconds"], [[s, m.get("wall_time_s")] for s, m in
                                                             manifests.items()]), ""]
    models = [[s, os.path.join(run_path, s, "model")] for s in trained]
    if models:
        out += ["## Exported models", "", _table(["stage", "Hugging Face folder"], models), ""]
    out += ["## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(out)


def _downstream(recipe: Recipe, run_path: str, manifests: dict[str, dict]) -> list[str]:
    results = manifests.get("finetune", {}).get("stats", {}).get("results")
    if not results:
        return []
    from pipelines.finetune.published import PUBLISHED, SOURCE

    published = PUBLISHED.get(recipe.name)
    seeds = len(recipe.finetune.seeds) if recipe.finetune else 1
    out = ["## Downstream (pattern locked)", "", results_table(results, recipe.name, published, seeds), ""]
    if published:
        out += [f"Published figures: {SOURCE}", ""]
    out += ["Per seed (the export's global sparsity beside it):", "", seed_table(results), "",
            "Fine-tuned models: " + ", ".join(f"`{os.path.join(run_path, 'finetune', t, 'model')}`" for t in results),
            ""]
    return out


class ReportStage:
    name = "report"
    needs_ray = False

    def config(self, recipe: Recipe) -> dict[str, Any]:
        return {"recipe": recipe.model_dump(mode="json", exclude={"tracking", "ray"})}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return {s: (read_manifest(ctx.run_dir.stage_dir(s)) or {}).get("fingerprint") for s in UPSTREAM}

    def run(self, ctx: StageContext) -> StageResult:
        run_path = ctx.run_dir.path
        manifests = {s: m for s in UPSTREAM if (m := read_manifest(ctx.run_dir.stage_dir(s)))}
        outputs = {}
        png = os.path.join(run_path, "student", "model", "sparsity.png")
        if os.path.exists(png):
            shutil.copyfile(png, os.path.join(ctx.stage_dir, "sparsity.png"))
            outputs["sparsity.png"] = file_sha256(os.path.join(ctx.stage_dir, "sparsity.png"))
        path = os.path.join(ctx.stage_dir, "README.md")
        write_text_atomic(render_report(ctx.recipe, run_path, manifests), path)
        outputs["README.md"] = file_sha256(path)
        ctx.tracker.log_artifact(path, "report")
        return StageResult({"stages_reported": sorted(manifests)}, outputs)
