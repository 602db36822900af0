"""Running the job graph: each stage is skipped when its manifest matches, else (re)done.

Rerunning the same command is how an interrupted job resumes: finished stages are skipped, and an
unfinished one continues from what its interrupted attempt left (shards, checkpoints) when its
fingerprint is unchanged, or starts clean when the recipe or its inputs changed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Iterable, Optional

from orchestrator.manifest import MANIFEST, fingerprint, read_manifest, why_stale, write_manifest
from orchestrator.recipe.schema import Recipe
from orchestrator.rundir import RunDir
from orchestrator.stages import ORDER, STAGES, StageContext
from pipelines.atomic import write_json_atomic

ATTEMPT = "attempt.json"


def select_stages(recipe: Recipe, requested: Optional[Iterable[str]]) -> list[str]:
    wanted = list(requested) if requested else list(recipe.stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(ORDER)})")
    return [s for s in ORDER if s in wanted]


def run_pipeline(recipe: Recipe, run_dir: str, stages: Optional[Iterable[str]] = None, force: bool = False,
                 console: Callable[[str], None] = print) -> dict[str, dict]:
    """Run the selected stages in order; returns stage -> manifest."""
    selected = select_stages(recipe, stages)
    rd = RunDir(run_dir)
    rd.acquire()
    manifests: dict[str, dict] = {}
    connected = False
    try:
        rd.check_recipe(recipe, force)
        rd.write_recipe(recipe)
        console(f"pofa: run directory {rd.path}")
        for name in selected:
            stage = STAGES[name]
            ctx = StageContext(recipe, rd, rd.stage_dir(name))
            config, inputs = stage.config(recipe), stage.inputs(ctx)
            fp = fingerprint({"stage": name, "config": config, "inputs": inputs})
            reason = "--force" if force else why_stale(ctx.stage_dir, fp)
            if reason is None:
                console(f"[{name}] up to date (manifest matches): skipped")
                manifests[name] = read_manifest(ctx.stage_dir) or {}
                continue
            _prepare_attempt(ctx.stage_dir, fp, clean=force)
            console(f"[{name}] running ({reason})")
            if not connected:
                from orchestrator.ray_runtime import connect

                console(f"pofa: Ray at {connect(recipe.ray)}")
                connected = True
            started = time.time()
            result = stage.run(ctx)
            manifests[name] = write_manifest(ctx.stage_dir, name, fp, inputs, config, result.stats, result.outputs,
                                             started)
            console(f"[{name}] done in {manifests[name]['wall_time_s']:.1f}s")
    finally:
        rd.release()
    return manifests


def _prepare_attempt(stage_dir: str, fp: str, clean: bool) -> None:
    """Keep an interrupted attempt's partial work only if it was made with the same fingerprint."""
    attempt = os.path.join(stage_dir, ATTEMPT)
    previous = None
    if os.path.exists(attempt):
        with open(attempt) as f:
            previous = json.load(f).get("fingerprint")
    if clean or previous != fp:
        shutil.rmtree(stage_dir, ignore_errors=True)
    os.makedirs(stage_dir, exist_ok=True)
    manifest = os.path.join(stage_dir, MANIFEST)
    if os.path.exists(manifest):
        os.unlink(manifest)  # an unfinished stage must never look finished
    write_json_atomic({"fingerprint": fp, "started": time.time()}, attempt)
