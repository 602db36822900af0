"""Checks that run on the driver before any worker starts, so bad input fails fast and clearly."""
from __future__ import annotations

import os
import time
from typing import Any

import ray

from pipelines.models.build import resolve_model_config
from workers import native_ops
from workers.stage_outputs import PreprocessOutput, read_output
from workers.train.inputs import check_shards, collator_settings, load_tokenizer, saved_vocab
from workers.train.spec import TrainSpec


def _shortfall(cfg: Any) -> str | None:
    """What the cluster lacks for the stage's workers right now, or None."""
    total = ray.cluster_resources()
    need_cpu, need_gpu = cfg.num_workers * cfg.cpus_per_worker, cfg.num_workers * cfg.gpus_per_worker
    if need_gpu > total.get("GPU", 0):
        return (f"gpus_per_worker={cfg.gpus_per_worker} x num_workers={cfg.num_workers} needs {need_gpu} GPUs; "
                f"the Ray cluster has {total.get('GPU', 0)}")
    if need_cpu > total.get("CPU", 0):
        return (f"cpus_per_worker={cfg.cpus_per_worker} x num_workers={cfg.num_workers} needs {need_cpu} CPUs; "
                f"the Ray cluster has {total.get('CPU', 0)}")
    return None


def _request_capacity(cfg: Any, bundles: bool) -> None:
    """Ask an autoscaling cluster for the workers' bundles (cleared again with bundles=False); a
    cluster without an autoscaler ignores the request."""
    try:
        from ray.autoscaler.sdk import request_resources

        bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
        request_resources(bundles=[bundle] * cfg.num_workers if bundles else [])
    except Exception:  # noqa: BLE001 - no autoscaler (local Ray): the wait below still applies
        pass


def check_resources(spec: Any) -> None:
    """The cluster must hold the stage's workers. With `resource_wait_s` (recipe: ray.resource_wait_s)
    it may get there: nodes still joining, or an autoscaler asked for them, within that time."""
    cfg = spec.train
    if not ray.is_initialized():
        raise RuntimeError("run_training needs a Ray cluster: call ray.init() first")
    wait_s = float(getattr(spec, "resource_wait_s", 0.0))
    short = _shortfall(cfg)
    if short is None:
        return
    if wait_s > 0:
        _request_capacity(cfg, bundles=True)
        deadline = time.monotonic() + wait_s
        try:
            while short is not None and time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                short = _shortfall(cfg)
        finally:
            _request_capacity(cfg, bundles=False)  # Ray Train's own placement group asks from here on
        if short is None:
            return
        raise ValueError(f"{spec.run.name}: {short} after waiting {wait_s:g} s for nodes to join "
                         "(ray.resource_wait_s); check that the worker nodes can reach the head")
    raise ValueError(f"{spec.run.name}: {short}. On a cluster whose nodes are still joining or autoscaling, set "
                     "ray.resource_wait_s to wait for them")


def _check_data(spec: TrainSpec, record: PreprocessOutput, vocab: dict[str, int]) -> None:
    cfg = spec.train
    check_shards(spec.layout, record)
    for split, out in record.splits.items():
        per_rank = out.rows // cfg.num_workers
        if split == "train" and per_rank < cfg.samples_per_rank_per_step:
            raise ValueError(f"training.global_batch_size={cfg.global_batch_size} needs "
                             f"{cfg.samples_per_rank_per_step} rows per worker per step, but the train split has "
                             f"{out.rows} rows for {cfg.num_workers} workers")
        if split == "validation" and per_rank == 0:
            raise ValueError(f"the validation split has {out.rows} rows: fewer than training.num_workers="
                             f"{cfg.num_workers}")
    if spec.init_dir is not None:
        if not os.path.isdir(spec.init_dir):
            raise ValueError(f"{spec.stage}: initial model {spec.init_dir!r} does not exist (train the teacher first)")
        theirs = saved_vocab(spec.init_dir)
        if theirs is not None and theirs != vocab:
            raise ValueError(f"{spec.init_dir} was trained with another tokenizer than {spec.layout.tokenizer}")


def check_checkpoint_world(spec: Any) -> None:
    """The newest checkpoint resumes with this many workers and this ZeRO stage: as it is, after a
    conversion to DeepSpeed's universal form (pretraining), or not at all (refused, naming why)."""
    from workers.train.elastic import prepare_resume

    prepare_resume(spec)


def preflight(spec: TrainSpec) -> None:
    record = read_output(spec.layout, "preprocess", PreprocessOutput)
    tokenizer = load_tokenizer(spec.layout.path(record.tokenizer))
    collator_settings(tokenizer, record.masking)
    if spec.init_dir is None and spec.model is not None:
        resolve_model_config(spec.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    _check_data(spec, record, tokenizer.get_vocab())
    check_checkpoint_world(spec)
    native_ops.check_cache()
    check_resources(spec)
