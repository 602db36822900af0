"""Export the trained model as a Hugging Face folder (safetensors + config + tokenizer).

Full fp32 weights are gathered with DeepSpeed's public accessor on every rank (a collective under
ZeRO-3, and it reads the fp32 master copy under bf16/fp16), then rank 0 loads them into a fresh
model built from the config, which re-ties the MLM decoder to the word embeddings.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from deepspeed.utils import safe_get_full_fp32_param
from transformers import AutoModelForPreTraining, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from pipelines.atomic import atomic_dir
from pipelines.sparsity.config import PruningConfig
from pipelines.sparsity.report import prunable_weights, sparsity_report, write_report


def gather_full_state(engine: Any) -> dict[str, torch.Tensor]:
    """name -> full fp32 CPU tensor; call on every rank, in the same order (collective)."""
    state = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (full if full is not None else param.detach()).float().cpu().clone()
    return state


def _tied_keys(model: torch.nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def export_model(state: dict[str, torch.Tensor], config: PretrainedConfig, tokenizer_dir: str, out_dir: str,
                 pruning: Optional[PruningConfig] = None, auto_class: Any = AutoModelForPreTraining) -> dict[str, Any]:
    """Write `out_dir` atomically (rank 0 only); returns the sparsity report (empty without pruning).
    `auto_class`: the Auto class that must load the export (pretraining, QA or classification head)."""
    hf_logging.disable_progress_bar()  # no per-shard bars in the workers' logs
    model = auto_class.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise RuntimeError(f"export: weights do not match the architecture (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    report: dict[str, Any] = {}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        if pruning is not None:
            report = sparsity_report(prunable_weights(model, pruning), pruning.mask)
            write_report(report, tmp)
        auto_class.from_pretrained(tmp)  # verify it loads before publishing
    return report
