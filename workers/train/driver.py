"""Driver side of a training stage: pre-flight checks, the Ray Train TorchTrainer, the result."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from workers.storage import except_checkpoints
from workers.train.loop import train_loop
from workers.train.preflight import preflight
from workers.train.progress import format_summary
from workers.train.spec import TrainResult


def build_trainer(spec: Any, loop: Callable[[dict], None] = train_loop) -> TorchTrainer:
    """Same `RunConfig(name, storage_path)` on every call: rebuilding it is how Ray Train V2 resumes.
    `spec`: a TrainSpec or another spec with the same paths and `train` settings (fine-tuning's)."""
    cfg = spec.train
    use_gpu = cfg.gpus_per_worker > 0
    storage_path, filesystem = os.path.abspath(spec.ray_storage_path), None
    store = getattr(spec, "store", None)
    if store is not None and store.remote:  # Ray Train's own state goes to the store too: any node resumes
        rel = store.rel(storage_path)
        if rel is not None:
            filesystem, storage_path = store.filesystem()[0], store.remote_path(rel)
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    return TorchTrainer(
        loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=spec.ray_run_name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
    )


def _start_steps(spec: Any) -> list[int]:
    path = os.path.join(spec.stage_dir, "attempts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["start_step"] for line in f if line.strip()]


def pull_stage_outputs(spec: Any) -> None:
    """Rank 0 may have run on another node: bring its summary, logs and export to this mirror."""
    store = getattr(spec, "store", None)
    rel = store.rel(spec.stage_dir) if store is not None and store.remote else None
    if rel is not None:
        store.pull(rel, exclude=except_checkpoints)


# Ray Train V2 gives a worker group 60 s to start; workers importing torch + DeepSpeed on a busy or
# autoscaling node can take longer. Propagated from the driver to the controller at fit().
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_S = "600"


def run_training(spec: Any, *, echo: bool = True, loop: Callable[[dict], None] = train_loop,
                 check: Callable[[Any], None] = preflight) -> TrainResult:
    """Run (or resume) one training run to completion and export its model. Needs `ray.init()` first.
    Defaults: a pretraining stage (TrainSpec); fine-tuning passes its own loop and checks."""
    started = time.time()
    check(spec)
    os.environ.setdefault(START_TIMEOUT_ENV, START_TIMEOUT_S)
    os.makedirs(spec.stage_dir, exist_ok=True)
    if os.path.exists(spec.summary_path):
        os.remove(spec.summary_path)  # the summary describes the attempt that finishes now
    build_trainer(spec, loop).fit()
    pull_stage_outputs(spec)
    with open(spec.summary_path) as f:
        summary = json.load(f)
    summary["start_steps"] = _start_steps(spec)
    summary["elapsed_s"] = time.time() - started
    if echo:
        print(format_summary(summary), flush=True)
    return TrainResult(stage=spec.stage, model_dir=spec.model_dir, final_step=summary["final_step"],
                       metrics=summary["metrics"], checkpoint=summary["checkpoint"],
                       start_steps=summary["start_steps"], elapsed_s=summary["elapsed_s"])
