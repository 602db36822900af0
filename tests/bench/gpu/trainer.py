"""The training engine the step benchmarks drive: pofa's DeepSpeed engine (`workers/train/engine.py`,
ZeRO-2, bf16, one process) with its DeepSpeed mask enforcer, or, where DeepSpeed cannot start, a
plain torch AdamW under bf16 autocast with pofa's torch mask enforcer (the result names which ran).
"""
from __future__ import annotations

import contextlib
import gc
import os
import socket
import traceback
from typing import Any

import torch
from torch import Tensor, nn

from pipelines.sparsity.enforcer import MaskEnforcer, TorchMaskEnforcer
from pipelines.training.config import TrainConfig


def train_config(batch: int, device: torch.device) -> TrainConfig:
    """One worker, the whole batch one micro-batch: ZeRO-2 and bf16 as a GPU recipe would set them."""
    return TrainConfig(num_workers=1, gpus_per_worker=1.0 if device.type == "cuda" else 0.0, zero_stage=2,
                       precision="bf16", global_batch_size=batch, micro_batch_size=batch)


def single_process_env() -> None:
    """What torchrun would set for a world of one: DeepSpeed starts its process group from these."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "LOCAL_WORLD_SIZE": "1"}.items():
        os.environ.setdefault(key, value)


class DeepSpeedTrainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        from workers.train.engine import build_engine

        single_process_env()
        self.engine = build_engine(model, cfg)
        self.engine.train()
        self.module: nn.Module = self.engine.module
        self.device: torch.device = self.engine.device
        self.kind = f"DeepSpeed ZeRO-{cfg.zero_stage} {cfg.precision} ({type(self.engine.optimizer).__name__})"

    def __call__(self, **inputs: Tensor) -> Any:
        return self.engine(**inputs)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def enforcer(self, keep: bool) -> MaskEnforcer:
        from workers.deepspeed_masks import DeepSpeedMaskEnforcer

        return DeepSpeedMaskEnforcer(self.engine, keep=keep)

    def stored(self, name: str) -> Tensor | None:
        """The fp32 master copy of a parameter (the stored values under `keep`)."""
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(self.module.get_parameter(name))


class TorchTrainer:
    """Fallback: fp32 weights, bf16 autocast, torch AdamW (the loss and masks are pofa's all the same)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, why: str) -> None:
        self.module = model.to(device=device, dtype=torch.float32).train()  # whatever a failed start left
        self.device = device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.kind = f"torch AdamW, bf16 autocast ({why})"
        self._enforcer: TorchMaskEnforcer | None = None

    def __call__(self, **inputs: Tensor) -> Any:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self.module(**inputs)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def enforcer(self, keep: bool) -> MaskEnforcer:
        self._enforcer = TorchMaskEnforcer(self.module, self.optimizer, keep=keep)
        return self._enforcer

    def stored(self, name: str) -> Tensor | None:
        return self._enforcer.values.stored.get(name) if self._enforcer is not None else None


Trainer = DeepSpeedTrainer | TorchTrainer


def make_trainer(model: nn.Module, cfg: TrainConfig, device: torch.device, deepspeed: bool = True) -> Trainer:
    if not deepspeed:
        return TorchTrainer(model, cfg, device, "--no-deepspeed")
    try:
        return DeepSpeedTrainer(model, cfg)
    except Exception as exc:  # a missing package or a failed start: measure on, and say which engine ran
        traceback.print_exc()  # the whole story in the log; the result names the engine that ran
        why = f"DeepSpeed did not start: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"[:300]
        print(f"bench-gpu: {why}; this step row runs on torch AdamW instead", flush=True)
        return TorchTrainer(model, cfg, device, why)


def close(trainer: Trainer) -> None:
    """Free the engine's device memory before the next one is built."""
    with contextlib.suppress(Exception):  # best effort: a failed clean-up must not hide the measurement
        if isinstance(trainer, DeepSpeedTrainer):
            trainer.engine.destroy()
    gc.collect()  # the engine's reference cycles hold its buffers
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
