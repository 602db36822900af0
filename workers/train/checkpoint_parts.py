"""The named stateful parts of a training checkpoint, and how a part's state becomes files.

A part is anything with `state_dict()` / `load_state_dict(state)` (torchtitan's and Composer's
`Stateful`). Its state is stored without pickle: tensors (at any depth) in `<part>.safetensors`,
everything else in `<part>.json`. The DeepSpeed engine is the one part that writes its own files
(`EnginePart`: model and optimizer, ZeRO-sharded per rank).
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
DS_TAG = "deepspeed"  # the engine's sub-folder inside a checkpoint


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(value, Mapping):
        return {str(k): _split(v, f"{key}/{k}" if key else str(k), tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def save_state(folder: str, stem: str, state: Mapping[str, Any]) -> list[str]:
    """`<stem>.json` (+ `<stem>.safetensors` when the state holds tensors); returns the file names."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _split(state, "", tensors)
    names = [f"{stem}.json"]
    if tensors:
        save_file(tensors, os.path.join(folder, f"{stem}.safetensors"))
        names.append(f"{stem}.safetensors")
    with open(os.path.join(folder, f"{stem}.json"), "w") as f:
        json.dump(plain, f)
    return names


def load_state(folder: str, stem: str) -> dict[str, Any]:
    with open(os.path.join(folder, f"{stem}.json")) as f:
        plain = json.load(f)
    tensor_file = os.path.join(folder, f"{stem}.safetensors")
    tensors = load_file(tensor_file) if os.path.exists(tensor_file) else {}
    return _join(plain, tensors)


class ValuePart:
    """A part whose state the owner reads and restores through two functions (step, data cursor...)."""

    def __init__(self, get: Callable[[], dict[str, Any]], put: Callable[[Mapping[str, Any]], None]) -> None:
        self._get, self._put = get, put

    def state_dict(self) -> dict[str, Any]:
        return self._get()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._put(state)


class RNGState:
    """This process's torch (and CUDA), Python and NumPy generators: dropout and any host-side draw."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        version, mt, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["python"] = [version, list(mt), gauss]
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state.get("cuda"):
            torch.cuda.set_rng_state_all(list(state["cuda"])[:torch.cuda.device_count()])
        version, mt, gauss = state["python"]
        random.setstate((version, tuple(mt), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class LRPosition:
    """Where the LR schedule stands. The LR is a pure function of the step, so the position is the
    step; the stored LR catches a schedule that changed under a resumed run."""

    def __init__(self, lr_fn: Callable[[int], float], step: Callable[[], int]) -> None:
        self.lr_fn, self._step = lr_fn, step

    def state_dict(self) -> dict[str, Any]:
        step = self._step()
        return {"step": step, "lr": self.lr_fn(step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = self.lr_fn(int(state["step"]))
        if not np.isclose(expected, float(state["lr"]), rtol=1e-9, atol=1e-15):
            raise ValueError(f"the LR schedule changed: step {state['step']} had LR {state['lr']:.6g} when the "
                             f"checkpoint was written, the recipe now gives {expected:.6g}")


UNIVERSAL = "universal"  # the engine's files in DeepSpeed's universal form: loadable on any worker count


class EnginePart:
    """The DeepSpeed engine (model, optimizer, ZeRO partitions): writes its own files, collectively.
    `universal`: load the checkpoint's universal form (a resume on another worker count or ZeRO stage;
    the engine was built to read it)."""

    def __init__(self, engine: Any, universal: bool = False) -> None:
        self.engine, self.universal = engine, universal

    def save(self, folder: str, step: int) -> None:
        self.engine.save_checkpoint(folder, tag=DS_TAG, client_state={"pofa_step": step})

    def load(self, folder: str) -> None:
        source = os.path.join(folder, UNIVERSAL) if self.universal else folder
        _, client = self.engine.load_checkpoint(source, tag=DS_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {source}")
