"""One row per exported model: sizes, then an ONNX graph timed in ONNX Runtime, then the ratio to
the dense model it is compared with. A row that cannot be measured (runtime not installed, a model
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

from pipelines.inference.bench import time_session
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


def measure_module(model: InferenceModel, cfg: InferenceConfig, work: str, templates: dict[str, Any], name: str = "",
                   int8_weights: Sequence[str] = ()) -> dict[str, Any]:
    """Convert, check and time one model; ConversionError when it cannot be converted."""
    graph = to_onnx(model, cfg.seq_len, os.path.join(work, "model.onnx"), templates, name)
    path, how, diff = graph.path, graph.how, graph.max_abs_diff
    if int8_weights:
        path = quantize_int8(graph.path, os.path.join(work, "model.int8.onnx"), list(int8_weights))
        how, diff = how + ", then ONNX Runtime dynamic int8", max_abs_diff(path, model, cfg.seq_len)
    vocab = int(getattr(model.model.config, "vocab_size", 2) or 2)
    timings = time_session(session(path), model.input_names, cfg.batch_sizes, cfg.seq_len, vocab, cfg.min_seconds)
    lat, tput = timings[min(timings)], timings[max(timings)]
    return {"graph": model.graph, "onnx": how, "max_abs_diff": diff, "timings": {str(b): t for b, t in timings.items()},
            "latency_ms": lat["ms"], "throughput_seq_s": tput["seq_per_s"]}


def measure_model(entry: ModelEntry, cfg: InferenceConfig, templates: dict[str, Any],
                  missing: Optional[str] = None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": entry.name, "folder": entry.folder, "reference": entry.reference,
                           "int8": entry.int8, "error": None}
    work = tempfile.mkdtemp(prefix="pofa-inference-")
    try:
        try:
            row.update(sizes(entry, work))
        except Exception as exc:  # a missing or unreadable weights file: say so, measure the rest
            row["error"] = f"sizes: {summary(exc)}"
            return row
        if missing:
            row["error"] = missing
            return row
        try:
            if entry.int8:
                state, names = _int8_state(entry)
                model = load_for_inference(entry.folder, state)
            else:
                model, names = load_for_inference(entry.folder), []
            row.update(measure_module(model, cfg, work, templates, entry.name, names))
        except ConversionError as exc:
            row["error"] = f"cannot convert: {exc}"
        except Exception as exc:  # the report never fails the run for one model
            row["error"] = summary(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up over the dense reference (> 1: faster): its latency ÷ this latency, this throughput ÷ its."""
    by_name = {r["name"]: r for r in rows}
    for row in rows:
        ref = by_name.get(row["reference"] or row["name"])
        ok = ref is not None and ref.get("latency_ms") and row.get("latency_ms")
        row["latency_speedup"] = round(ref["latency_ms"] / row["latency_ms"], 3) if ok else None
        row["throughput_speedup"] = round(row["throughput_seq_s"] / ref["throughput_seq_s"], 3) if ok else None


def inference_report(entries: Sequence[ModelEntry], cfg: InferenceConfig) -> dict[str, Any]:
    """The whole report: the machine, the runtime and one row per entry (in order)."""
    missing = runtime_missing(cfg.runtime)
    version = None if missing else importlib.import_module(cfg.runtime).__version__
    templates: dict[str, Any] = {}
    rows = [measure_model(e, cfg, templates, missing) for e in entries]
    add_ratios(rows)
    return {"runtime": cfg.runtime, "runtime_version": version, "provider": "CPUExecutionProvider",
            "torch_threads": torch.get_num_threads(), "batch_sizes": cfg.batch_sizes, "seq_len": cfg.seq_len,
            "latency_batch": min(cfg.batch_sizes), "throughput_batch": max(cfg.batch_sizes),
            "machine": machine_kernels(), "models": rows}
