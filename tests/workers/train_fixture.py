"""A tiny preprocess output (Parquet shards, tokenizer, manifest) and tiny training specs for the
training-engine tests and the benchmark. Written with pyarrow, shaped like the preprocess stage's."""
from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

import ray
import ray.cloudpickle

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import BertTokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(95)]
SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("token_type_ids", pa.list_(pa.int8())),
                    ("next_sentence_label", pa.int8()), ("masked_lm_positions", pa.list_(pa.int32())),
                    ("masked_lm_ids", pa.list_(pa.int32()))])


def _row(rng: random.Random, max_len: int) -> dict[str, Any]:
    """[CLS] A [SEP] B [SEP] over a toy language: B continues A's counting pattern unless random."""
    n_a = rng.randint(3, (max_len - 3) // 2)
    n_b = rng.randint(3, max_len - 3 - n_a)
    start = rng.randrange(len(WORDS))
    a = [5 + (start + i) % len(WORDS) for i in range(n_a)]
    is_random = rng.random() < 0.5
    b_start = rng.randrange(len(WORDS)) if is_random else start + n_a
    b = [5 + (b_start + i) % len(WORDS) for i in range(n_b)]
    ids = [2] + a + [3] + b + [3]
    return {"input_ids": ids, "token_type_ids": [0] * (n_a + 2) + [1] * (n_b + 1),
            "next_sentence_label": int(is_random), "masked_lm_positions": [], "masked_lm_ids": []}


def _write_split(folder: str, rows: list[dict[str, Any]], files: int) -> None:
    os.makedirs(folder, exist_ok=True)
    per = -(-len(rows) // files)
    for i in range(files):
        chunk = rows[i * per:(i + 1) * per]
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), os.path.join(folder, f"part-{i:05d}.parquet"),
                       row_group_size=37)


def make_preprocess(run_dir: str, n_train: int = 256, n_val: int = 64, max_len: int = 32, seed: int = 0) -> str:
    pre = os.path.join(run_dir, "preprocess")
    rng = random.Random(seed)
    _write_split(os.path.join(pre, "train"), [_row(rng, max_len) for _ in range(n_train)], files=3)
    _write_split(os.path.join(pre, "validation"), [_row(rng, max_len) for _ in range(n_val)], files=1)
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    BertTokenizer(vocab=vocab).save_pretrained(os.path.join(pre, "tokenizer"))
    with open(os.path.join(pre, "manifest.json"), "w") as f:
        json.dump({"stats": {"max_seq_length": max_len, "train_instances": n_train},
                   "config": {"masking": "dynamic", "max_predictions_per_seq": 5, "masked_lm_prob": 0.15}}, f)
    return pre


def tiny_train(**overrides: Any) -> dict[str, Any]:
    base = dict(num_workers=2, cpus_per_worker=1, zero_stage=2, global_batch_size=16, micro_batch_size=4,
                max_steps=6, learning_rate=1e-3, warmup_ratio=0.1, eval_every=3, eval_batches=2,
                checkpoint_every=2, keep_checkpoints=2, max_failures=0)
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
    ray.init(num_cpus=4, log_to_driver=False)
    return True


def read_weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def make_teacher_export(run_dir: str, seed: int = 3) -> str:
    """A from-scratch tiny BERT saved like the teacher stage's export, for student tests."""
    from transformers import AutoTokenizer

    from pipelines.models.build import build_pretraining_model
    from pipelines.models.config import BertInit, ModelConfig

    tok = AutoTokenizer.from_pretrained(os.path.join(run_dir, "preprocess", "tokenizer"))
    cfg = ModelConfig(init=BertInit(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    model = build_pretraining_model(cfg, vocab_size=len(tok), pad_token_id=tok.pad_token_id, seed=seed)
    out = os.path.join(run_dir, "teacher", "model")
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
    return TrainSpec(stage="student", run_dir=run_dir, train=TrainConfig(**tiny_train(**train)),
                     init_dir=os.path.join(run_dir, "teacher", "model"), pruning=pruning, seed=5, progress=False,
                     fault=fault)


def _run_student_driver(run_dir: str, marker: str) -> None:
    """`python -m tests.workers.train_fixture <run_dir> <marker>`: a driver the kill test SIGKILLs.
    Joins the cluster named by RAY_ADDRESS; checkpoints every step (the last 2 kept); rank 0 stalls
    after 5 updates, when checkpoints 4 and 5 exist."""
    from workers.train.spec import FaultInjection
    from workers.train.stage import run_training

    ray.init()
    run_training(student_spec(run_dir, fault=FaultInjection(step=5, rank=0, marker=marker, kind="stall"),
                              checkpoint_every=1))


def fake_checkpoint(root: str, step: int, world: int = 2) -> str:
    """Same file kinds as a real one: DeepSpeed torch zips, JSON, safetensors, manifest."""
    import torch

    from workers.train import checkpoint as ckpt
    from workers.train import state as st
    from workers.train.data import DataCursor

    tmp = os.path.join(root, ckpt.tmp_dir_name(step))
    os.makedirs(os.path.join(tmp, ckpt.DS_TAG))
    for r in range(world):
        torch.save({"w": torch.randn(64, 64)}, os.path.join(tmp, ckpt.DS_TAG, f"zero_pp_rank_{r}_optim_states.pt"))
        st.save_rank_state(tmp, r, world, step, DataCursor(0, step * 8))
    with open(os.path.join(tmp, "latest"), "w") as f:
        f.write(ckpt.DS_TAG)
    st.save_trainer_state(tmp, {"step": step})
    ckpt.write_manifest(tmp, step, world)
    assert ckpt.verify_checkpoint(tmp) is None
    final = os.path.join(root, ckpt.step_dir_name(step))
    ckpt.finalize(tmp, final)
    return final


if __name__ == "__main__":
    _run_student_driver(sys.argv[1], sys.argv[2])
