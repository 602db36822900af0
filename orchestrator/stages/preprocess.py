"""Stage 1: English Wikipedia (or any text source) -> sharded BERT pretraining data, on Ray Data."""
from __future__ import annotations

import os
from typing import Any

from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import StageContext, StageResult
from pipelines.config_keys import result_defining
from pipelines.data.config import SourceConfig


def source_identity(src: SourceConfig) -> dict[str, Any]:
    """Cheap identity of the source: files by path, size and mtime; hub datasets by name and revision."""
    if src.kind == "hf_dataset" and not src.path:
        return {"hub": src.name, "config": src.config, "split": src.split, "revision": src.revision}
    paths = src.files() if src.kind != "hf_dataset" else [src.path]
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": out}


class PreprocessStage:
    name = "preprocess"

    def config(self, recipe: Recipe) -> dict[str, Any]:
        # result-defining keys only (num_workers and cpus_per_worker do not change a byte of the output);
        # an unset sentence_per_line left out too, so runs made before the key existed stay valid
        if recipe.preprocess is None:
            raise ValueError("preprocess: the recipe has no preprocess section")
        section = result_defining(recipe.preprocess)
        if section["source"].get("sentence_per_line") is None:
            section["source"].pop("sentence_per_line", None)
        return {"seed": recipe.seed, "preprocess": section}

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        return {"source": source_identity(ctx.recipe.preprocess.source)}

    def run(self, ctx: StageContext) -> StageResult:
        from workers.preprocess.job import run_preprocess

        stats, outputs, record = run_preprocess(ctx.recipe.preprocess, ctx.recipe.seed, ctx.layout, ctx.log_dir)
        return StageResult(stats, outputs, record)
