"""One line per finished stage (its key result) and the table that ends a run: stage, time, result,
where the outputs are. Read from the stages' manifests alone, so `pofa status` says the same."""
from __future__ import annotations

from typing import Mapping, Optional

from orchestrator.console import format_duration
from workers.run_layout import RunLayout
from orchestrator.stages import STAGES
from workers.stage_outputs import StageManifest


def key_result(stage: str, manifest: StageManifest, layout: RunLayout) -> str:
    """The one result a person looks for first in a stage (the stage says it)."""
    return STAGES[stage].result(manifest, layout)


def outputs_of(stage: str, manifest: StageManifest, layout: RunLayout) -> Optional[str]:
    return STAGES[stage].outputs_path(manifest, layout)


def result_line(stage: str, manifest: StageManifest, layout: RunLayout) -> str:
    return f"[{stage}] done in {format_duration(manifest.wall_time_s)}: {key_result(stage, manifest, layout)}"


def summary_lines(manifests: Mapping[str, StageManifest], layout: RunLayout) -> list[str]:
    """The run's table; skipped stages show the time they took when they ran."""
    rows = [(stage, format_duration(m.wall_time_s), key_result(stage, m, layout),
             _shown(layout, outputs_of(stage, m, layout))) for stage, m in manifests.items()]
    if not rows:
        return []
    # the stages' own times (a skipped stage counts the time it took when it ran)
    rows.append(("total", format_duration(sum(m.wall_time_s for m in manifests.values())), "", ""))
    widths = [max(len(r[i]) for r in rows + [("stage", "time", "result", "outputs")]) for i in range(3)]
    head = f"{'stage':{widths[0]}}  {'time':>{widths[1]}}  {'result':{widths[2]}}  outputs"
    return ["", head] + [f"{s:{widths[0]}}  {t:>{widths[1]}}  {r:{widths[2]}}  {o}".rstrip() for s, t, r, o in rows]


def _shown(layout: RunLayout, path: Optional[str]) -> str:
    if path is None:
        return "-"
    return layout.location_uri(path) if layout.store.remote else path
