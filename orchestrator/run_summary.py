"""One line per finished stage (its key result) and the table that ends a run: stage, time, result,
where the outputs are. Read from the stages' manifests alone, so `pofa status` says the same."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from orchestrator.console import format_duration
from workers.run_layout import RunLayout
from workers.stage_outputs import FinetuneOutput, StageManifest, TrainingOutput, output_of


def _f(v: Any, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def key_result(stage: str, manifest: StageManifest, layout: RunLayout) -> str:
    """The one result a person looks for first in a stage."""
    st = manifest.stats
    if stage == "preprocess":
        masked = st.get("masked_token_fraction")
        masking = f"{_f(masked, 3)} masked" if masked is not None else f"{st.get('masking', 'dynamic')} masking"
        return (f"{st.get('instances_train', '-')} train / {st.get('instances_validation', '-')} validation "
                f"instances, {st.get('tokens', '-')} tokens, {masking}")
    if stage in ("teacher", "student"):
        out = output_of(manifest, layout, TrainingOutput)
        m = out.metrics
        text = f"step {out.final_step}: val/mlm_acc {_f(m.get('val/mlm_acc'))}, val/nsp_acc {_f(m.get('val/nsp_acc'))}"
        if stage == "student":
            text += f", sparsity {_f(out.sparsity if out.sparsity is not None else m.get('sparsity/global'), 3)}"
        return text
    if stage == "finetune":
        from orchestrator.stages.finetune import HEADLINE_METRICS, task_results

        out = output_of(manifest, layout, FinetuneOutput)
        parts = []
        for name, task in out.tasks.items():
            res = task_results(task)
            metric = next((k for k in HEADLINE_METRICS if k in res), None)
            if metric is not None:
                parts.append(f"{name} {metric} {_f(res[metric], 2)} ({len(task.seeds)} seed(s))")
        return "; ".join(parts) or f"{len(out.tasks)} task(s)"
    if stage == "report":
        return "report written"
    return "done"


def outputs_of(stage: str, manifest: StageManifest, layout: RunLayout) -> Optional[str]:
    try:
        if stage in ("teacher", "student"):
            return layout.path(output_of(manifest, layout, TrainingOutput).model)
        if stage == "report":
            return layout.report
    except (ValueError, KeyError):
        return None
    return layout.stage_dir(stage)


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
