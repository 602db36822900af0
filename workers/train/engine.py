"""The DeepSpeed engine of one worker: config from the recipe, AdamW with BERT's decay groups."""
from __future__ import annotations

from typing import Any

import deepspeed
import torch
from torch import nn

from pipelines.training.config import TrainConfig
from workers import native_ops

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


def deepspeed_config(cfg: TrainConfig, universal: bool = False) -> dict[str, Any]:
    """ZeRO stage, precision and batch geometry; global batch = workers x micro x accumulation.
    `universal`: the engine will load a checkpoint in DeepSpeed's universal form (workers/train/elastic.py)."""
    config: dict[str, Any] = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "zero_optimization": {"stage": cfg.zero_stage},
        # the client AdamW below is torch's own: works on CPU and GPU alike
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if universal:
        config["checkpoint"] = {"load_universal": True}
    if cfg.max_grad_norm > 0:
        config["gradient_clipping"] = cfg.max_grad_norm
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name for k in NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, cfg: TrainConfig, universal: bool = False) -> Any:
    """deepspeed.initialize over the process group Ray Train already set up (gloo on CPU, nccl on GPU).
    DeepSpeed's native ops are loaded first, under pofa's build lock and settings (workers/native_ops.py):
    a stale build lock is removed, a build in progress is waited on with a limit, never forever."""
    native_ops.ensure_ops()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, universal))
    return engine


def set_learning_rate(engine: Any, lr: float) -> None:
    # ZeRO wraps the torch optimizer; its param_groups are the torch optimizer's own
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
