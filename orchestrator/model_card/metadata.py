"""The card's YAML half: license, base model, datasets, language, tags and `model-index` results,
built with huggingface_hub's `ModelCardData` / `EvalResult` so the hub's parser reads it back."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from orchestrator.model_card.exports import ExportRef
from orchestrator.model_card.records import RunRecords
from pipelines.finetune.tasks import get_task

if TYPE_CHECKING:
    from huggingface_hub import EvalResult, ModelCardData

# Apache-2.0: the license of every built-in recipe's base model (BERT, DistilBERT), of Intel's Prune
# OFA cards and of pofa itself; a model trained from scratch by pofa inherits pofa's.
LICENSE = "apache-2.0"
LANGUAGE = ["en"]  # every corpus and task pofa reads is English (Wikipedia, GLUE, SQuAD, Pang & Lee)
PIPELINE_TAG = {"pretraining": "fill-mask", "classification": "text-classification", "qa": "question-answering"}


def model_name(records: RunRecords, export: ExportRef) -> str:
    return f"{records.recipe.name}-{export.name.replace('/', '-')}"


def hub_id(name: Optional[str]) -> Optional[str]:
    """A hub repository name (`bert-base-uncased`, `org/model`); None for a local path or nothing."""
    if not name or name.startswith(("/", ".", "~", "pkg://")) or os.path.exists(name) or name.count("/") > 1:
        return None
    return name


def pretraining_dataset(records: RunRecords) -> tuple[str, Optional[str]]:
    """(dataset id for `model-index`, its hub id or None): the pretraining corpus."""
    pre = records.recipe.preprocess
    if pre is None:
        return "pretraining-corpus", None
    src = pre.source
    name = hub_id(src.name) if src.kind == "hf_dataset" else None
    return (name or ("wikipedia" if src.kind == "wikipedia_xml" else src.kind)), name


def task_dataset(records: RunRecords, task: str) -> tuple[str, Optional[str], Optional[str]]:
    """(dataset id, its config, its hub id or None) of a fine-tuning task."""
    spec = get_task(task)
    cfg = next((t for t in records.recipe.finetune.tasks if t.name == task), None) if records.recipe.finetune else None
    data = cfg.data if cfg else None
    if data is not None and (data.files or data.path):
        return task, None, None  # local files: no hub dataset to link
    if data is not None and data.dataset:
        name = hub_id(data.dataset)
        return (name or task), None, name
    if spec.hub:
        return spec.hub[0], (spec.hub[1] if len(spec.hub) > 1 else None), spec.hub[0]
    return task, None, None


def base_model(records: RunRecords, export: ExportRef) -> Optional[str]:
    """The hub model this export descends from (None: trained from scratch, or a local folder)."""
    ft = records.recipe.finetune
    if export.kind == "finetuned" and export.sparse and ft is not None and ft.model:
        return hub_id(ft.model)
    if export.kind == "finetuned" and not export.sparse and ft is not None and ft.teacher_model:
        return hub_id(ft.teacher_model)
    model = records.recipe.model
    return hub_id(model.name) if model is not None else None


def tags(records: RunRecords, export: ExportRef, sparsity: Optional[dict[str, Any]]) -> list[str]:
    out = ["pofa", "prune-once-for-all", "knowledge-distillation"]
    if export.sparse:
        out += ["sparse", "sparsity", "pruning", "magnitude-pruning"]
        if sparsity is not None:
            out.append(f"sparsity-{round(100 * sparsity['global_sparsity'])}")
            kind = sparsity.get("mask_kind") or "unstructured"
            out.append({"block": "block-sparse", "nm": "n-m-sparse"}.get(kind, "unstructured"))
    else:
        out.append("dense")
    if export.kind == "finetuned":
        out.append(export.task or "")
    return [t for t in out if t]


def _pretraining_results(records: RunRecords, stage: str) -> list["EvalResult"]:
    from huggingface_hub import EvalResult

    out = records.training.get(stage)
    if out is None:
        return []
    ds_type, _ = pretraining_dataset(records)
    ds_config = records.recipe.preprocess.source.config if records.recipe.preprocess else None
    pct = round(100 * records.recipe.preprocess.validation_fraction) if records.recipe.preprocess else None
    ds_name = f"pretraining corpus, {pct}% held-out documents" if pct is not None else "pretraining corpus"
    results = []
    for key, label in (("val/mlm_acc", "MLM accuracy"), ("val/nsp_acc", "NSP accuracy")):
        if key in out.metrics:
            results.append(EvalResult(task_type="fill-mask", task_name="Masked language modelling",
                                      dataset_type=ds_type, dataset_name=ds_name, dataset_config=ds_config,
                                      dataset_split="validation",
                                      metric_type="accuracy", metric_name=label,
                                      metric_value=round(float(out.metrics[key]), 4)))
    return results


def _task_results(records: RunRecords, task: str, metrics: dict[str, float], what: str) -> list["EvalResult"]:
    """A fine-tuning task's metrics (percent), one EvalResult each, on the split each was measured on."""
    from huggingface_hub import EvalResult

    spec = get_task(task)
    ds_type, ds_config, _ = task_dataset(records, task)
    results = []
    for key in spec.metrics:
        if key not in metrics:
            continue
        prefix = next((p for p in spec.eval_splits if p and key.startswith(p + "_")), "")
        metric = key[len(prefix) + 1:] if prefix else key
        results.append(EvalResult(task_type=PIPELINE_TAG[spec.kind], task_name=task, dataset_type=ds_type,
                                  dataset_name=task if not prefix else f"{task} ({spec.eval_splits[prefix]})",
                                  dataset_config=ds_config, dataset_split=spec.eval_splits[prefix],
                                  metric_type=metric, metric_name=f"{key} ({what})",
                                  metric_value=round(float(metrics[key]), 2)))
    return results


def eval_results(records: RunRecords, export: ExportRef) -> list["EvalResult"]:
    """Pretraining exports: validation MLM/NSP accuracy, and for the student each task's result after
    fine-tuning with the pattern locked (mean of seeds, as Intel's cards show it). A fine-tuned export:
    its own result on its task."""
    from orchestrator.stages.finetune import task_results

    if export.kind == "pretraining":
        results = _pretraining_results(records, export.name)
        if export.sparse and records.finetune is not None:
            for task, out in records.finetune.tasks.items():
                mean = {k: v for k, v in task_results(out).items() if isinstance(v, float)}
                n = len(out.seeds)
                results += _task_results(records, task, mean,
                                         f"fine-tuned, pattern locked, mean of {n} seed{'s' if n > 1 else ''}")
        return results
    tasks = records.finetune.tasks if records.finetune else {}
    task = tasks.get(export.task or "")
    if task is None:
        return []
    run = task.teacher if not export.sparse else next(
        (r for r in task.seeds.values() if r.seed == export.seed), None)
    if run is None:
        return []
    return _task_results(records, export.task, run.metrics,
                         "dense task teacher" if not export.sparse else f"seed {run.seed}")


def card_data(records: RunRecords, export: ExportRef, sparsity: Optional[dict[str, Any]]) -> "ModelCardData":
    from huggingface_hub import ModelCardData

    datasets = []
    _, pre_hub = pretraining_dataset(records)
    if pre_hub:
        datasets.append(pre_hub)
    if export.task:
        hub = task_dataset(records, export.task)[2]
        if hub:
            datasets.append(hub)
    kind = "pretraining" if export.kind == "pretraining" else get_task(export.task or "").kind
    results = eval_results(records, export)
    return ModelCardData(language=LANGUAGE, license=LICENSE, library_name="transformers",
                         base_model=base_model(records, export), datasets=datasets or None,
                         tags=tags(records, export, sparsity), pipeline_tag=PIPELINE_TAG[kind],
                         model_name=model_name(records, export), eval_results=results or None)
