"""Stage 1: English Wikipedia (or any text source) -> sharded BERT pretraining data, on Ray Data."""
from __future__ import annotations

import functools
import os
from typing import Any

from orchestrator.recipe.schema import Recipe
from orchestrator.stages.base import Stage, StageContext, StageResult, fmt
from pipelines.config_keys import result_defining
from pipelines.data.config import SourceConfig
from pipelines.data.multistream import index_path
from workers.run_layout import RunLayout
from workers.stage_outputs import PreprocessOutput, StageManifest


def source_identity(src: SourceConfig) -> dict[str, Any]:
    """Cheap identity of the source: files by path, size and mtime; hub datasets by name and revision."""
    if src.kind == "hf_dataset" and not src.path:
        return {"hub": src.name, "config": src.config, "split": src.split, "revision": src.revision}
    paths = src.files() if src.kind != "hf_dataset" else [src.path]
    if src.kind == "wikipedia_xml":  # a multistream dump's index decides its windows, and so its shards
        paths += [i for i in map(index_path, list(paths)) if i is not None and i not in paths]
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": out}


class PreprocessStage(Stage):
    name = "preprocess"
    output_model = PreprocessOutput
    sections = ("preprocess",)
    reads_pretraining_data = True  # its own splits: the datasets it wrote

    def result(self, manifest: StageManifest, layout: RunLayout) -> str:
        st = manifest.stats
        masked = st.get("masked_token_fraction")
        masking = f"{fmt(masked, 3)} masked" if masked is not None else f"{st.get('masking', 'dynamic')} masking"
        return (f"{st.get('instances_train', '-')} train / {st.get('instances_validation', '-')} validation "
                f"instances, {st.get('tokens', '-')} tokens, {masking}")

    def held(self, layout: RunLayout) -> list[str]:
        folder = layout.path("preprocess", ".shards")  # one completion record per finished shard
        records = sum(1 for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else 0
        return [f"{records} finished shard(s)"] if records else []

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
        from orchestrator.console import source_progress_line
        from workers.preprocess.job import run_preprocess

        # the live line: how much of the source the finished shards cover (its total is known once the
        # read units are listed)
        progress = (functools.partial(ctx.console.report, self.name, render=source_progress_line)
                    if ctx.console is not None else None)
        stats, outputs, record = run_preprocess(ctx.recipe.preprocess, ctx.recipe.seed, ctx.layout, ctx.log_dir,
                                                on_progress=progress, stall_timeout_s=ctx.recipe.ray.stall_timeout_s)
        return StageResult(stats, outputs, record)
