"""The report stage's inference section: which exports of the run to measure, `report/inference.json`,
the README's "## Inference" table and the MLflow metrics. The measuring is `pipelines/inference/`."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Optional

from orchestrator.recipe.schema import Recipe
from pipelines.atomic import write_json_atomic
from workers.run_layout import RunLayout
from workers.stage_outputs import FinetuneOutput, StageManifest, TrainingOutput, output_of
from workers.tracking import Tracker

if TYPE_CHECKING:  # measuring imports torch: only the report stage's run needs it, not `pofa status`
    from pipelines.inference.measure import ModelEntry

_MB = 1e6
UNSTEADY_FACTOR = 1.25  # pipelines.inference.measure.UNSTEADY_FACTOR (not imported: it imports torch)
METRICS = ("latency_ms", "throughput_seq_s", "latency_speedup", "throughput_speedup", "sparsity")


def inference_entries(layout: RunLayout, manifests: Mapping[str, StageManifest]) -> list[ModelEntry]:
    """Every export of the run, each with the dense model of the same kind it is compared with: the
    teacher for the student, a task's dense teacher for its seeds and their int8 QAT exports."""
    from pipelines.inference.measure import ModelEntry

    entries = []
    for stage in ("teacher", "student"):
        if stage in manifests:
            ref = "teacher" if stage == "student" and "teacher" in manifests else None
            entries.append(ModelEntry(stage, layout.path(output_of(manifests[stage], layout, TrainingOutput).model), ref))
    if "finetune" in manifests:
        for task, out in output_of(manifests["finetune"], layout, FinetuneOutput).tasks.items():
            ref = f"{task}/teacher" if out.teacher else None
            if out.teacher:
                entries.append(ModelEntry(ref, layout.path(out.teacher.model)))
            for run in out.seeds.values():
                entries.append(ModelEntry(f"{task}/{run.name}", layout.path(run.model), ref))
                if run.quantization:
                    entries.append(ModelEntry(f"{task}/{run.name}/int8", layout.path(run.model), ref, int8=True))
    return entries


def run_inference(recipe: Recipe, layout: RunLayout, manifests: Mapping[str, StageManifest],
                  tracker: Tracker) -> Optional[dict[str, Any]]:
    """Measure, write `report/inference.json` and log the metrics; None when the recipe turns it off
    (an older inference.json is removed: the report never shows numbers it did not measure)."""
    cfg = recipe.report.inference
    path = layout.inference_report
    if not cfg.enabled:
        if os.path.exists(path):
            os.remove(path)
        return None
    entries = inference_entries(layout, manifests)
    for entry in entries:  # this node's copy of each export (a no-op on local disk)
        layout.pull(entry.folder)
    from pipelines.inference.measure import inference_report

    report = inference_report(entries, cfg)
    for row in report["models"]:
        row["folder"] = layout.rel(row["folder"])
    write_json_atomic(report, path)
    tracker.log_metrics(inference_metrics(report), step=0)
    tracker.log_artifact(path, "report")
    return report


def inference_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """`inference.<model>.<metric>` (a model's `/` written `.`), sizes in MB; rows without a value skip it."""
    out: dict[str, float] = {}
    for row in report["models"]:
        key = "inference." + row["name"].replace("/", ".")
        values = {m: row.get(m) for m in METRICS}
        values["safetensors_mb"] = row["safetensors_bytes"] / _MB if row.get("safetensors_bytes") else None
        values["sparse_mb"] = row["sparse_bytes"] / _MB if row.get("sparse_bytes") else None
        out.update({f"{key}.{m}": float(v) for m, v in values.items() if v is not None})
    return out


def _cell(v: Any, fmt: str = "{}") -> str:
    return "–" if v is None else fmt.format(v)


def _note(row: Mapping[str, Any]) -> str:
    if row.get("error"):
        return "**not measured**: " + str(row["error"]).replace("|", "\\|").replace("\n", " ")
    notes = [f"**unsteady**: {row['unsteady']}"] if row.get("unsteady") else []
    if row.get("max_abs_diff") is not None:
        notes.append(f"max abs diff vs PyTorch {row['max_abs_diff']:.1e}")
    return "; ".join(notes)


def _ratio(row: Mapping[str, Any], key: str) -> str:
    """The speed-up and, where it was timed in turns with its reference, its range over the rounds."""
    cell = _cell(row.get(key), "{:.2f}")
    spread = row.get(f"{key}_range")
    return f"{cell} ({spread[0]:.2f}–{spread[1]:.2f})" if spread and row.get(key) is not None else cell


def _load_line(report: Mapping[str, Any]) -> str:
    loads, cores = [v for v in report.get("load_avg") or [] if v is not None], report.get("cores")
    if not loads or not cores:
        return ""
    line = f"Load average {' → '.join(f'{v:.1f}' for v in loads)} on {cores} cores while measuring."
    if max(loads) > cores:
        line += (" **The machine was busier than its cores: every timing above is slowed and scattered; read "
                 "the ratios only where their round-by-round range is narrow.**")
    return line


def render_inference(report: Optional[Mapping[str, Any]]) -> list[str]:
    if report is None:
        return []
    lat, tput = report["latency_batch"], report["throughput_batch"]
    runtime = f"{report['runtime']} {report['runtime_version'] or '(not installed)'}"
    out = ["## Inference", "",
           f"CPU, {runtime} ({report['provider']}), sequence length {report['seq_len']}: latency at batch {lat} "
           f"(median ms per batch), throughput at batch {tput} (sequences/s). \"× dense\" is the speed-up over "
           "the dense model of the same kind in this run (> 1: faster). Pretraining exports are timed as "
           "their encoder, fine-tuned ones as the task model. Sizes: the safetensors file, and the "
           "compressed sparse encoding (bitmask of the non-zeros plus their values, zlib; "
           "`pipelines.inference.sparse_encoding.load_sparse` restores it bit for bit). All figures: "
           "`report/inference.json`. In brackets: the lowest and highest ratio over the timing "
           "rounds (the two models ran in turns, so each round compares them at the same moment); a row whose "
           "rounds disagree by more than "
           f"{UNSTEADY_FACTOR:g}x is marked unsteady.", "",
           "| model | graph | sparsity | throughput (seq/s) | × dense | latency (ms) | × dense | safetensors MB "
           "| compressed MB | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["models"]:
        cells = [r["name"], r.get("graph") or "–", _cell(r.get("sparsity"), "{:.3f}"),
                 _cell(r.get("throughput_seq_s"), "{:.1f}"), _ratio(r, "throughput_speedup"),
                 _cell(r.get("latency_ms"), "{:.2f}"), _ratio(r, "latency_speedup"),
                 _cell(r.get("safetensors_bytes") and r["safetensors_bytes"] / _MB, "{:.2f}"),
                 _cell(r.get("sparse_bytes") and r["sparse_bytes"] / _MB, "{:.2f}"), _note(r)]
        out.append("| " + " | ".join(cells) + " |")
    machine = report["machine"]
    kernels = ("unknown (no /proc/cpuinfo)" if machine["kernels"] is None
               else ", ".join(machine["kernels"]) or "none of the vector extensions pofa looks for")
    out += ["", f"Machine: {machine['cpu']}; CPU kernels: {kernels}. {machine['explanation']} {_load_line(report)}"
            .rstrip(), ""]
    return out
