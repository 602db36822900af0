"""A finished run for the model-card tests, made by pofa's real producers without Ray: the preprocess
stage's (tests/workers/train_fixture.py), the workers' `export_model` for every export (teacher,
90%-sparse student, a task's dense teacher and one seed), the manifest writer with each stage's typed
record, and the report's inference measurement. Trained weights are not needed: the cards read records."""
from __future__ import annotations

import os
import time

import torch

from orchestrator.fingerprints import write_stage_manifest
from orchestrator.recipe.load import load_recipe
from orchestrator.rundir import RunDir
from orchestrator.stages.finetune import _copy_model
from orchestrator.stages.inference_section import run_inference
from pipelines.sparsity.config import PruningConfig
from tests.workers.train_fixture import make_preprocess
from workers.run_layout import RunLayout
from workers.stage_outputs import FinetuneOutput, FinetuneRunOutput, FinetuneTaskOutput, TrainingOutput, load_manifest
from workers.tracking import NullTracker

SEED = 42
OVERRIDES = [f"finetune.seeds=[{SEED}]", "report.inference.min_seconds=0.05", "report.inference.batch_sizes=[1,2]",
             "report.inference.seq_len=16"]


def _pruned(state: dict[str, torch.Tensor], names: list[str], sparsity: float) -> dict[str, torch.Tensor]:
    """The smallest |w| of each named weight set to exact zero (what the student's export holds)."""
    out = dict(state)
    for name in names:
        w = state[name]
        k = int(round(sparsity * w.numel()))
        threshold = w.abs().flatten().kthvalue(k).values
        out[name] = torch.where(w.abs() <= threshold, torch.zeros_like(w), w)
    return out


def _export(layout: RunLayout, folder: str, auto: type, sparse: bool, num_labels: int = 0) -> float | None:
    from transformers import BertConfig

    from pipelines.sparsity.selection import select_parameters
    from workers.train.export import export_model

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels or 2)
    torch.manual_seed(0)
    model = auto.from_config(config)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruning = PruningConfig() if sparse else None
    if pruning is not None:
        state = _pruned(state, select_parameters(model, pruning), 0.9)
    report = export_model(state, config, layout.tokenizer, folder, pruning, auto_class=auto)
    return report.get("global_sparsity")


def make_card_run(run_dir: str) -> RunLayout:
    from transformers import AutoModelForPreTraining, AutoModelForSequenceClassification

    layout = make_preprocess(run_dir, documents=60, max_len=32)
    recipe = load_recipe("tiny", OVERRIDES)
    RunDir(run_dir).write_recipe(recipe)
    started = time.time()
    for stage, sparse in (("teacher", False), ("student", True)):
        folder = layout.training(stage).model
        sp = _export(layout, folder, AutoModelForPreTraining, sparse)
        metrics = {"val/mlm_acc": 0.25 if sparse else 0.3, "val/nsp_acc": 0.6, "val/loss": 5.5}
        write_stage_manifest(layout, stage, stage, {}, {}, {}, layout.file_hashes(stage, folder),
                             TrainingOutput(model=layout.rel(folder), final_step=30, sparsity=sp, metrics=metrics),
                             started)
    runs = {}
    for name, sparse, accuracy in (("teacher", False, 80.0), (f"seed-{SEED}", True, 70.0)):
        run = layout.finetune_run("polarity", name)
        sp = _export(layout, run.model, AutoModelForSequenceClassification, sparse, 2)
        runs[name] = FinetuneRunOutput(name=name, seed=SEED, model=layout.rel(run.model), final_step=20,
                                       metrics={"accuracy": accuracy}, sparsity=sp)
    task_model = layout.task_model("polarity")
    _copy_model(layout.path(runs[f"seed-{SEED}"].model), task_model)
    output = FinetuneOutput(tasks={"polarity": FinetuneTaskOutput(model=layout.rel(task_model), teacher=runs["teacher"],
                                                                  seeds={str(SEED): runs[f"seed-{SEED}"]})})
    write_stage_manifest(layout, "finetune", "finetune", {}, {}, {}, layout.file_hashes("finetune", task_model),
                         output, started)
    manifests = {s: load_manifest(layout, s) for s in ("preprocess", "teacher", "student", "finetune")}
    run_inference(recipe, layout, manifests, NullTracker())  # report/inference.json, as the report stage measures
    return layout
