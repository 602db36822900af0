"""Checks that run on the driver before any worker starts, so bad input fails fast and clearly."""
from __future__ import annotations

import json
import os
from typing import Any

import ray

from pipelines.models.build import resolve_model_config
from workers.train import checkpoint as ckpt
from workers.train.data import total_rows
from workers.train.inputs import collator_settings, load_tokenizer, read_manifest
from workers.train.spec import TrainSpec


def check_resources(spec: Any) -> None:
    cfg = spec.train
    if not ray.is_initialized():
        raise RuntimeError("run_training needs a Ray cluster: call ray.init() first")
    total = ray.cluster_resources()
    need_cpu, need_gpu = cfg.num_workers * cfg.cpus_per_worker, cfg.num_workers * cfg.gpus_per_worker
    if need_gpu > total.get("GPU", 0):
        raise ValueError(f"training.gpus_per_worker={cfg.gpus_per_worker} x num_workers={cfg.num_workers} needs "
                         f"{need_gpu} GPUs; the Ray cluster has {total.get('GPU', 0)}")
    if need_cpu > total.get("CPU", 0):
        raise ValueError(f"training.cpus_per_worker={cfg.cpus_per_worker} x num_workers={cfg.num_workers} needs "
                         f"{need_cpu} CPUs; the Ray cluster has {total.get('CPU', 0)}")


def _check_data(spec: TrainSpec, vocab: dict[str, int]) -> None:
    cfg = spec.train
    for split, folder in (("train", spec.train_data_dir), ("validation", spec.validation_data_dir)):
        rows = total_rows(folder)  # raises when no shard exists
        per_rank = rows // cfg.num_workers
        if split == "train" and per_rank < cfg.samples_per_rank_per_step:
            raise ValueError(f"training.global_batch_size={cfg.global_batch_size} needs "
                             f"{cfg.samples_per_rank_per_step} rows per worker per step, but {folder} has {rows} "
                             f"rows for {cfg.num_workers} workers")
        if split == "validation" and per_rank == 0:
            raise ValueError(f"{folder} has {rows} rows: fewer than training.num_workers={cfg.num_workers}")
    if spec.init_dir is not None:
        init_tok = os.path.join(spec.init_dir, "tokenizer.json")
        if not os.path.isdir(spec.init_dir):
            raise ValueError(f"{spec.stage}: initial model {spec.init_dir!r} does not exist (train the teacher first)")
        if os.path.isfile(init_tok):
            with open(init_tok) as f:
                theirs = json.load(f).get("model", {}).get("vocab")
            if isinstance(theirs, dict) and theirs != vocab:
                raise ValueError(f"{spec.init_dir} was trained with another tokenizer than {spec.tokenizer_dir}")


def check_checkpoint_world(spec: Any) -> None:
    for _, path in ckpt.list_checkpoints(spec.checkpoint_dir)[:1]:
        try:
            world = ckpt.read_manifest(path).get("world_size")
        except (OSError, ValueError):
            return  # unreadable: the workers set it aside and fall back
        if world is not None and world != spec.train.num_workers:
            raise ValueError(f"{path} was written by {world} workers; resuming needs training.num_workers={world} "
                             f"(got {spec.train.num_workers})")


def preflight(spec: TrainSpec) -> None:
    tokenizer = load_tokenizer(spec.tokenizer_dir)
    collator_settings(tokenizer, read_manifest(spec.manifest_path))
    if spec.init_dir is None and spec.model is not None:
        resolve_model_config(spec.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    _check_data(spec, tokenizer.get_vocab())
    check_checkpoint_world(spec)
    check_resources(spec)
