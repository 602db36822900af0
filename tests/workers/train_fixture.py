"""A tiny preprocess output (Parquet shards, tokenizer, manifest) made by the preprocess stage's own
producers, and tiny training specs for the training-engine tests and the benchmark."""
from __future__ import annotations

import json
import os
import random
import sys
import time
from typing import Any

import ray
import ray.cloudpickle
from transformers import BertTokenizer

from workers.run_layout import RunLayout

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(95)]


def _toy_corpus(path: str, documents: int, seed: int, lines: tuple[int, int] = (4, 9)) -> None:
    """A BERT-format text file (one sentence per line, a blank line between documents) over a toy
    language: each document counts on through the words, so segment B continuing segment A is
    learnable, and a random B is not."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(documents):
            word = rng.randrange(len(WORDS))
            for _ in range(rng.randint(*lines)):
                n = rng.randint(3, 8)
                f.write(" ".join(WORDS[(word + i) % len(WORDS)] for i in range(n)) + "\n")
                word += n
            f.write("\n")


def make_preprocess(run_dir: str, documents: int = 120, max_len: int = 32, seed: int = 0, masking: str = "dynamic",
                    max_predictions_per_seq: int = 5, dupe_factor: int = 1,
                    lines: tuple[int, int] = (4, 9), shards: int = 3) -> RunLayout:
    """The preprocess stage's real output for a toy corpus, made by its real producers without Ray:
    `prepare_tokenizer`, `read_shards` and `ShardProcessor` (the Ray Data stage's two halves), then
    `finish_preprocess` and the manifest writer the orchestrator uses. Returns the run's layout."""
    from orchestrator.fingerprints import fingerprint, write_stage_manifest
    from pipelines.data.config import PreprocessConfig
    from pipelines.data.sources import read_units
    from workers.preprocess.job import finish_preprocess, prepare_tokenizer
    from workers.preprocess.tasks import ShardProcessor, read_shards, shard_results, unit_batch

    layout = RunLayout.open(run_dir)
    os.makedirs(layout.root, exist_ok=True)
    corpus, vocab_dir = os.path.join(layout.root, "corpus.txt"), os.path.join(layout.root, "toy-vocab")
    _toy_corpus(corpus, documents, seed, lines)
    BertTokenizer(vocab={token: i for i, token in enumerate(SPECIALS + WORDS)}).save_pretrained(vocab_dir)
    cfg = PreprocessConfig.model_validate({
        "source": {"kind": "text", "path": corpus}, "tokenizer": {"name": vocab_dir}, "max_seq_length": max_len,
        "masking": masking, "max_predictions_per_seq": max_predictions_per_seq, "dupe_factor": dupe_factor,
        "validation_fraction": 0.2, "documents_per_shard": max(1, documents // shards), "min_document_tokens": 8})
    started = time.time()
    prepare_tokenizer(cfg, layout)
    units = read_units(cfg.source)
    batch = unit_batch(units)
    processor = ShardProcessor(cfg.model_dump_json(), seed, layout)
    records = [r for rows in read_shards(batch, cfg.model_dump_json()) for r in shard_results(processor(rows))]
    stats, outputs, record = finish_preprocess(cfg, layout, sorted(records, key=lambda r: r.shard_id))
    config = cfg.model_dump(mode="json")
    write_stage_manifest(layout, "preprocess", fingerprint(config), {}, config, stats, outputs, record, started)
    return layout


def tiny_train(**overrides: Any) -> dict[str, Any]:
    base = dict(num_workers=2, cpus_per_worker=1, zero_stage=2, global_batch_size=16, micro_batch_size=4,
                max_steps=6, learning_rate=1e-3, warmup_ratio=0.1, eval_every=3, eval_batches=2,
                checkpoint_every=2, keep_checkpoints=2, max_failures=0, retry_backoff_s=0.2)
    base.update(overrides)
    return base


class FileTracker:
    """A picklable Tracker that appends to a JSONL file (what the rank-0 worker sent)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def log_metrics(self, metrics, step):  # noqa: ANN001
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_artifact(self, local_path, artifact_path=None):  # noqa: ANN001
        with open(self.path, "a") as f:
            f.write(json.dumps({"artifact": local_path}) + "\n")

    def set_tags(self, tags):  # noqa: ANN001
        pass

    def flush(self):
        pass


# Ray workers cannot import `tests`: ship this module's classes (FileTracker) by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def read_losses(metrics_path: str) -> dict[int, list[float]]:
    """step -> every training loss logged for it in a metrics.jsonl (a replayed step has several)."""
    out: dict[int, list[float]] = {}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def start_ray() -> bool:
    """Start a small local Ray for these tests unless one is up; True when we started it. It stays up
    for the rest of the session (Ray shuts it down at exit): starting one costs seconds."""
    if ray.is_initialized():
        return False
    # keep the dashboard: Ray Train V2 asks the state API whether its controller lives, and
    # without it removes the workers' placement group mid-run
    from workers.preemption import SETUP_HOOK

    ray.init(num_cpus=4, log_to_driver=False, runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    return True


def read_weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def make_teacher_export(run_dir: str, seed: int = 3, dropout: float | None = None) -> str:
    """A from-scratch tiny BERT saved like the teacher stage's export, for student tests. `dropout=0`:
    a model whose steps do not depend on which worker's random stream runs them (elastic tests)."""
    from transformers import AutoTokenizer

    from pipelines.models.build import build_pretraining_model
    from pipelines.models.config import BertInit, ModelConfig

    layout = RunLayout.open(run_dir)
    tok = AutoTokenizer.from_pretrained(layout.tokenizer)
    cfg = ModelConfig(init=BertInit(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    model = build_pretraining_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id, seed=seed)
    if dropout is not None:
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = dropout
    out = layout.training("teacher").model
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def student_spec(run_dir: str, fault: Any = None, **train: Any) -> Any:
    """Student stage: KD from the frozen teacher export, cubic GMP to 90% by step 4, LR rewinding."""
    from pipelines.sparsity.config import PruningConfig, ScheduleConfig
    from pipelines.training.config import TrainConfig
    from workers.train.spec import TrainSpec

    pruning = PruningConfig(schedule=ScheduleConfig(policy_begin_step=0, policy_end_step=4, begin_pruning_step=0,
                                                    end_pruning_step=4, pruning_frequency=2, final_sparsity=0.9),
                            lr_rewind=True)
    layout = RunLayout.open(run_dir)
    return TrainSpec(stage="student", layout=layout, train=TrainConfig(**tiny_train(**train)),
                     init_dir=layout.training("teacher").model, pruning=pruning, seed=5, progress=False, fault=fault)


def _run_student_driver(run_dir: str, marker: str) -> None:
    """`python -m tests.workers.train_fixture <run_dir> <marker>`: a driver the kill test SIGKILLs.
    Joins the cluster named by RAY_ADDRESS; checkpoints every step (the last 2 kept); rank 0 stalls
    after 5 updates, when checkpoints 4 and 5 exist."""
    from workers.train.driver import run_training
    from workers.train.spec import FaultInjection

    ray.init()
    run_training(student_spec(run_dir, fault=FaultInjection(step=5, rank=0, marker=marker, kind="stall"),
                              checkpoint_every=1))


def committed_steps(spec: Any) -> list[int]:
    """Committed checkpoint steps of a training spec's run, newest first."""
    from workers.train.checkpointer import committed_checkpoints

    return [step for step, _ in committed_checkpoints(spec.layout, spec.run)]


def checkpoint_masks(run: Any, step: int, folder: str | None = None) -> dict:
    """The pruning masks a checkpoint holds (name -> bool tensor); `folder`: one set aside."""
    from workers.train.checkpoint_parts import load_state

    path = os.path.join(run.checkpoints, folder) if folder else run.checkpoint_step(step)
    return load_state(path, "pruning")["masks"]


if __name__ == "__main__":
    _run_student_driver(sys.argv[1], sys.argv[2])
