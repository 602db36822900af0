"""Everything a model card is written from, read once from a run directory through its typed records."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from orchestrator.recipe.schema import Recipe
from pipelines.sparsity.report_files import report_paths
from workers.run_layout import RunLayout
from workers.stage_outputs import (FinetuneOutput, PreprocessOutput, StageManifest, TrainingOutput, load_manifest,
                                   output_of)

STAGES = ("preprocess", "teacher", "student", "finetune", "report")


@dataclass(frozen=True)
class RunRecords:
    """A run's recipe, finished stages' manifests and output records, and the report's inference figures."""

    recipe: Recipe
    layout: RunLayout
    manifests: dict[str, StageManifest]
    preprocess: Optional[PreprocessOutput] = None
    training: dict[str, TrainingOutput] = field(default_factory=dict)  # teacher / student
    finetune: Optional[FinetuneOutput] = None
    inference: Optional[dict[str, Any]] = None  # report/inference.json, when the report measured

    @classmethod
    def read(cls, layout: RunLayout, recipe: Optional[Recipe] = None,
             manifests: Optional[dict[str, StageManifest]] = None) -> "RunRecords":
        """`recipe`/`manifests`: the caller's, when it holds them (a stage); else read from the run folder."""
        if recipe is None:
            with open(layout.recipe) as f:
                recipe = Recipe.model_validate(yaml.safe_load(f))
        if manifests is None:
            manifests = {s: m for s in STAGES if (m := load_manifest(layout, s)) is not None}
        training = {s: output_of(manifests[s], layout, TrainingOutput) for s in ("teacher", "student")
                    if s in manifests}
        pre = output_of(manifests["preprocess"], layout, PreprocessOutput) if "preprocess" in manifests else None
        ft = output_of(manifests["finetune"], layout, FinetuneOutput) if "finetune" in manifests else None
        inference = None
        if os.path.exists(layout.inference_report):
            with open(layout.inference_report) as f:
                inference = json.load(f)
        return cls(recipe, layout, dict(manifests), pre, training, ft, inference)

    def inference_row(self, name: str) -> Optional[dict[str, Any]]:
        rows = (self.inference or {}).get("models", [])
        return next((r for r in rows if r.get("name") == name), None)


def read_sparsity(folder: str) -> Optional[dict[str, Any]]:
    """The export's own sparsity report (`sparsity.json`, written beside its weights), None when dense."""
    path, _ = report_paths(folder)
    return json.loads(path.read_text()) if path.exists() else None
