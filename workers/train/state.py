"""What goes into a checkpoint besides DeepSpeed's own files, in formats that load without unpickling
(JSON and safetensors): data cursor, RNG states per rank, pruning state, trainer state."""
from __future__ import annotations

import json
import os
import random
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from workers.train.checkpoint import TRAINER_STATE
from workers.train.data import DataCursor


def _write_json(path: str, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


# -- RNG ---------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, mt, gauss = plain["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- per rank ----------------------------------------------------------------------------------
def save_rank_state(folder: str, rank: int, world_size: int, step: int, cursor: DataCursor) -> None:
    tensors, plain = capture_rng()
    save_file(tensors, os.path.join(folder, f"rank-{rank}.rng.safetensors"))
    _write_json(os.path.join(folder, f"rank-{rank}.json"),
                {"rank": rank, "world_size": world_size, "step": step, "cursor": cursor.to_dict(), "rng": plain})


def load_rank_state(folder: str, rank: int, world_size: int) -> DataCursor:
    state = _read_json(os.path.join(folder, f"rank-{rank}.json"))
    if state["world_size"] != world_size:
        raise ValueError(f"checkpoint {folder} was written by {state['world_size']} workers, this run has "
                         f"{world_size}: set training.num_workers={state['world_size']} to resume it")
    restore_rng(load_file(os.path.join(folder, f"rank-{rank}.rng.safetensors")), state["rng"])
    return DataCursor(**state["cursor"])


# -- trainer -----------------------------------------------------------------------------------
def save_trainer_state(folder: str, state: dict[str, Any]) -> None:
    _write_json(os.path.join(folder, TRAINER_STATE), state)


def load_trainer_state(folder: str) -> dict[str, Any]:
    return _read_json(os.path.join(folder, TRAINER_STATE))


# -- pruning -----------------------------------------------------------------------------------
def save_pruning_state(folder: str, state: dict[str, Any]) -> None:
    masks = {name: m.contiguous() for name, m in state["masks"].items()}
    save_file(masks, os.path.join(folder, "pruning.safetensors"))
    _write_json(os.path.join(folder, "pruning.json"), {k: v for k, v in state.items() if k != "masks"})


def load_pruning_state(folder: str) -> Optional[dict[str, Any]]:
    path = os.path.join(folder, "pruning.json")
    if not os.path.exists(path):
        return None
    state = _read_json(path)
    state["masks"] = load_file(os.path.join(folder, "pruning.safetensors"))
    return state
