"""Batches of unpadded features -> padded model inputs (what `AutoModelFor*` forward takes)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

# Feature column -> model argument, passed through when every row has it.
_TARGETS = {"label": "labels", "labels": "labels", "start_positions": "start_positions",
            "end_positions": "end_positions"}


def collate_features(rows: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad input_ids (with `pad_token_id`) and token_type_ids (with 0) to the longest row; attention_mask
    marks real tokens. Other columns (example_index, offsets) stay out: the model would reject them."""
    if not rows:
        raise ValueError("collate_features: empty batch")
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    types = torch.zeros((len(rows), longest), dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        if r.get("token_type_ids") is not None:
            types[i, :n] = torch.as_tensor(r["token_type_ids"], dtype=torch.long)
        mask[i, :n] = 1
    out = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    for col, arg in _TARGETS.items():
        present = [col in r and r[col] is not None for r in rows]
        if all(present):
            out[arg] = torch.tensor([int(r[col]) for r in rows], dtype=torch.long)
        elif any(present):
            raise ValueError(f"collate_features: column {col!r} is in {sum(present)} of {len(rows)} rows")
    return out
