"""One row per exported model: sizes, then an ONNX graph timed in ONNX Runtime in turns with the dense
model it is compared with, and the ratio to it. A row that cannot be measured (runtime not installed, a model
that does not convert, a missing file) says why in its `error` and the others go on."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from pipelines.inference.bench import TimedSession, time_sessions
from pipelines.inference.config import InferenceConfig
from pipelines.inference.cpu_kernels import machine_kernels
from pipelines.inference.export_onnx import (ConversionError, InferenceModel, load_for_inference, max_abs_diff,
                                             quantize_int8, session, summary, to_onnx)
from pipelines.inference.sparse_encoding import save_sparse

WEIGHTS = "model.safetensors"
INT8_DIR, INT8_WEIGHTS = "int8", "model.int8.safetensors"  # pipelines/finetune/qat.py export_int8
# what torch.onnx.export and the timing need; pyproject.toml pins them
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript")}


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the row: teacher, student, <task>/teacher, <task>/seed-<s>, <task>/seed-<s>/int8
    folder: str  # the exported Hugging Face folder
    reference: Optional[str] = None  # the dense row it is compared with (None: itself dense)
    int8: bool = False  # measure the folder's int8 QAT export instead of its fp32 weights


def runtime_missing(runtime: str) -> Optional[str]:
    """Why `runtime` cannot be used here, or None."""
    for module in RUNTIME_MODULES[runtime]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{module} is not installed ({exc}); pyproject.toml pins the version pofa uses"
    return None


def weights_file(entry: ModelEntry) -> str:
    return os.path.join(entry.folder, INT8_DIR, INT8_WEIGHTS) if entry.int8 else os.path.join(entry.folder, WEIGHTS)


def _sparsity(folder: str, state: dict[str, torch.Tensor]) -> float:
    """The export's global sparsity (its sparsity.json), else the zero fraction of its encoder matrices."""
    path = os.path.join(folder, "sparsity.json")
    if os.path.exists(path):
        with open(path) as f:
            return float(json.load(f)["global_sparsity"])
    mats = [t for n, t in state.items() if ".layer." in n and n.endswith(".weight") and t.dim() == 2]
    total = sum(t.numel() for t in mats)
    return float(sum(int((t == 0).sum()) for t in mats) / total) if total else 0.0


def sizes(entry: ModelEntry, work: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = weights_file(entry)
    state = load_file(path)
    encoded = save_sparse(state, os.path.join(work, "weights.pofasz"))
    fp = {k: v for k, v in state.items() if not k.endswith(".scale")}
    return {"sparsity": round(_sparsity(entry.folder, fp), 4), "safetensors_bytes": os.path.getsize(path),
            "sparse_bytes": encoded}


def _int8_state(entry: ModelEntry) -> tuple[dict[str, torch.Tensor], list[str]]:
    from pipelines.finetune.qat import load_int8
    from safetensors.torch import load_file

    packed = load_file(weights_file(entry))
    names = [k for k, t in packed.items() if t.dtype == torch.int8]
    return load_int8(entry.folder, INT8_DIR), names


def convert_module(model: InferenceModel, cfg: InferenceConfig, work: str, templates: dict[str, Any], name: str = "",
                   int8_weights: Sequence[str] = ()) -> tuple[dict[str, Any], TimedGraph]:
    """Convert and check one model (ConversionError when it cannot be converted): the row's fields and
    the graph to time."""
    graph = to_onnx(model, cfg.seq_len, os.path.join(work, "model.onnx"), templates, name)
    path, how, diff = graph.path, graph.how, graph.max_abs_diff
    if int8_weights:
        path = quantize_int8(graph.path, os.path.join(work, "model.int8.onnx"), list(int8_weights))
        how, diff = how + ", then ONNX Runtime dynamic int8", max_abs_diff(path, model, cfg.seq_len)
    vocab = int(getattr(model.model.config, "vocab_size", 2) or 2)
    return {"graph": model.graph, "onnx": how, "max_abs_diff": diff}, TimedGraph(path, tuple(model.input_names), vocab)


@dataclass(frozen=True)
class TimedGraph:
    path: str
    input_names: tuple[str, ...]
    vocab: int

    def open(self) -> TimedSession:
        return TimedSession(session(self.path), self.input_names, self.vocab)


def timing_fields(timings: dict[int, dict[str, float]]) -> dict[str, Any]:
    lat, tput = timings[min(timings)], timings[max(timings)]
    return {"timings": {str(b): t for b, t in timings.items()}, "latency_ms": lat["ms"],
            "throughput_seq_s": tput["seq_per_s"], "latency_spread": _spread(lat), "throughput_spread": _spread(tput)}


def _spread(t: dict[str, Any]) -> Optional[float]:
    """The interquartile range of a batch size's run times over their median (0.1: the middle half of the
    runs lies within 10% of the median's size)."""
    if "ms_p25" not in t or not t["ms"]:
        return None
    return round((t["ms_p75"] - t["ms_p25"]) / t["ms"], 3)


# A speed-up whose rounds disagree by more than this factor (max / min of the round-by-round ratios)
# cannot be read: a busy machine gave 0.47 and 1.78 for two identically shaped models.
UNSTEADY_FACTOR = 1.25


def round_ratios(ref: dict[str, Any], row: dict[str, Any]) -> Optional[list[float]]:
    """[min, max] over rounds of the reference's time over the row's at one batch size: the rounds ran in
    turns, so each ratio compares the two at the same moment of the machine."""
    ratios = [a / b for a, b in zip(ref.get("round_ms", []), row.get("round_ms", [])) if a > 0 and b > 0]
    return [round(min(ratios), 3), round(max(ratios), 3)] if ratios else None


def unsteady(ranges: Sequence[Optional[list[float]]]) -> Optional[str]:
    """Why the row's ratios cannot be read (a round-by-round range wider than UNSTEADY_FACTOR), or None."""
    wide = [r for r in ranges if r and r[0] > 0 and r[1] / r[0] > UNSTEADY_FACTOR]
    if not wide:
        return None
    lo, hi = min(r[0] for r in wide), max(r[1] for r in wide)
    return (f"x dense ranged {lo:.2f}-{hi:.2f} over the timing rounds (more than {UNSTEADY_FACTOR:g}x apart): "
            "the machine's load changed while timing; rerun on a quiet machine before reading the ratio")


def measure_module(model: InferenceModel, cfg: InferenceConfig, work: str, templates: dict[str, Any], name: str = "",
                   int8_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Convert, check and time one model on its own."""
    row, graph = convert_module(model, cfg, work, templates, name, int8_weights)
    (timings,) = time_sessions([graph.open()], cfg.batch_sizes, cfg.seq_len, cfg.min_seconds)
    return {**row, **timing_fields(timings)}


def prepare_model(entry: ModelEntry, cfg: InferenceConfig, templates: dict[str, Any], work: str,
                  missing: Optional[str] = None) -> tuple[dict[str, Any], Optional[TimedGraph]]:
    """The row's sizes and conversion, and its graph (None when the row cannot be timed: `error` says why)."""
    row: dict[str, Any] = {"name": entry.name, "folder": entry.folder, "reference": entry.reference,
                           "int8": entry.int8, "error": None}
    try:
        row.update(sizes(entry, work))
    except Exception as exc:  # a missing or unreadable weights file: say so, measure the rest
        row["error"] = f"sizes: {summary(exc)}"
        return row, None
    if missing:
        row["error"] = missing
        return row, None
    try:
        if entry.int8:
            state, names = _int8_state(entry)
            model = load_for_inference(entry.folder, state)
            names = [n for n in map(model.own_name, names) if n is not None]
        else:
            model, names = load_for_inference(entry.folder), []
        fields, graph = convert_module(model, cfg, work, templates, entry.name, names)
        row.update(fields)
        return row, graph
    except ConversionError as exc:
        row["error"] = f"cannot convert: {exc}"
    except Exception as exc:  # the report never fails the run for one model
        row["error"] = summary(exc)
    return row, None


def time_rows(rows: list[dict[str, Any]], graphs: dict[str, TimedGraph], cfg: InferenceConfig) -> None:
    """Time every converted row. A row with a dense reference is timed in turns with it, and its speed-ups
    come from that shared measurement; a reference with no such row, and a row without one, alone. At
    most two sessions are open at once (model-card sizes: a BERT-Large graph is 1.3 GB)."""
    by_name = {r["name"]: r for r in rows}

    def fail(row: dict[str, Any], exc: Exception) -> None:
        row["error"] = f"timing: {summary(exc)}"
        graphs.pop(row["name"], None)

    for row in rows:
        row["latency_speedup"] = row["throughput_speedup"] = None
    for ref_name in dict.fromkeys(r["reference"] for r in rows if r["reference"]):
        pairs = [r for r in rows if r["reference"] == ref_name and r["name"] in graphs]
        ref = by_name.get(ref_name)
        if ref is None or ref_name not in graphs or not pairs:
            continue
        try:
            ref_session = graphs[ref_name].open()
        except Exception as exc:
            fail(ref, exc)
            continue
        for row in pairs:
            try:
                ref_t, row_t = time_sessions([ref_session, graphs[row["name"]].open()], cfg.batch_sizes,
                                             cfg.seq_len, cfg.min_seconds)
            except Exception as exc:
                fail(row, exc)
                continue
            row.update(timing_fields(row_t))
            pair_ref = timing_fields(ref_t)
            row["timed_with"] = ref_name
            row["latency_speedup"] = round(pair_ref["latency_ms"] / row["latency_ms"], 3)
            row["throughput_speedup"] = round(row["throughput_seq_s"] / pair_ref["throughput_seq_s"], 3)
            lat_b, tput_b = min(row_t), max(row_t)
            row["latency_speedup_range"] = round_ratios(ref_t[lat_b], row_t[lat_b])
            row["throughput_speedup_range"] = round_ratios(ref_t[tput_b], row_t[tput_b])
            row["unsteady"] = unsteady([row["latency_speedup_range"], row["throughput_speedup_range"]])
            if "latency_ms" not in ref:  # the reference's own row: its first shared measurement
                ref.update(pair_ref)
                ref["latency_speedup"] = ref["throughput_speedup"] = 1.0
        del ref_session
    for row in rows:
        if "latency_ms" in row or row["name"] not in graphs:
            continue
        try:
            (timings,) = time_sessions([graphs[row["name"]].open()], cfg.batch_sizes, cfg.seq_len, cfg.min_seconds)
        except Exception as exc:
            fail(row, exc)
            continue
        row.update(timing_fields(timings))
        if not row["reference"]:  # dense: compared with itself
            row["latency_speedup"] = row["throughput_speedup"] = 1.0


def inference_report(entries: Sequence[ModelEntry], cfg: InferenceConfig) -> dict[str, Any]:
    """The whole report: the machine, the runtime and one row per entry (in order)."""
    missing = runtime_missing(cfg.runtime)
    version = None if missing else importlib.import_module(cfg.runtime).__version__
    templates: dict[str, Any] = {}
    work = tempfile.mkdtemp(prefix="pofa-inference-")
    load_before = _load()
    try:  # convert everything first, then time: a model and its reference take turns on the machine
        rows, graphs = [], {}
        for i, entry in enumerate(entries):
            folder = os.path.join(work, str(i))
            os.makedirs(folder)
            row, graph = prepare_model(entry, cfg, templates, folder, missing)
            rows.append(row)
            if graph is not None:
                graphs[entry.name] = graph
        time_rows(rows, graphs, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"runtime": cfg.runtime, "runtime_version": version, "provider": "CPUExecutionProvider",
            "torch_threads": torch.get_num_threads(), "batch_sizes": cfg.batch_sizes, "seq_len": cfg.seq_len,
            "latency_batch": min(cfg.batch_sizes), "throughput_batch": max(cfg.batch_sizes),
            "machine": machine_kernels(), "cores": os.cpu_count(), "load_avg": [load_before, _load()],
            "models": rows}


def _load() -> Optional[float]:
    """The 1-minute load average (None where the platform has none): a load above the core count slows
    and scatters every timing."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
