"""Model-family differences the training loops must not care about: where the MLM and NSP logits
are in a pretraining model's output, and which inputs its forward accepts. BERT has MLM + NSP
heads and segment ids; DistilBERT (`DistilBertForMaskedLM`) has MLM only and no segment ids."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping, Optional

from torch import Tensor, nn


def mlm_logits(outputs: Any) -> Tensor:
    logits = getattr(outputs, "prediction_logits", None)
    return outputs.logits if logits is None else logits


def nsp_logits(outputs: Any) -> Optional[Tensor]:
    """None for models without a next-sentence head: their loss is MLM alone."""
    return getattr(outputs, "seq_relationship_logits", None)


@functools.lru_cache(maxsize=None)
def _forward_params(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def accepted_inputs(model: nn.Module, batch: Mapping[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    """The entries of `names` in `batch` that `model.forward` takes (DistilBERT has no token_type_ids).
    Read once per model class: this runs on every micro-batch."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    params = _forward_params(type(inner))
    return {k: batch[k] for k in names if k in batch and k in params}
