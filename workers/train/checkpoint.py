"""Checkpoint folders on disk: temporary name, manifest, verification, atomic rename, retention.

Layout of `<stage>/checkpoints/step-00000120/`:
    deepspeed/...              DeepSpeed's own checkpoint (model, ZeRO optimizer shards), tag "deepspeed"
    latest                     written by DeepSpeed
    trainer_state.json         step, world size, batch geometry (rank 0)
    rank-<r>.json              data cursor and Python/NumPy RNG states of rank r
    rank-<r>.rng.safetensors   torch RNG states of rank r
    pruning.json / pruning.safetensors   pruning schedule position and masks (student)
    MANIFEST.json              every file with its size, written last: a folder without it is incomplete

This module only handles files; `state.py` decides what goes in.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from typing import Callable, Optional

from safetensors import safe_open

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
DS_TAG = "deepspeed"
_STEP_RE = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def tmp_dir_name(step: int) -> str:
    return f".tmp-{step_dir_name(step)}"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Finished (renamed) checkpoints, newest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def _files(folder: str) -> dict[str, int]:
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    out.pop(MANIFEST, None)
    return out


def write_manifest(folder: str, step: int, world_size: int) -> None:
    manifest = {"step": step, "world_size": world_size, "created": time.time(), "files": _files(folder)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def read_manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        return json.load(f)


def check_file(path: str) -> Optional[str]:
    """Loadability without unpickling: zip CRCs of torch files, safetensors headers, JSON syntax."""
    try:
        if path.endswith(".pt"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return f"corrupt member {bad}" if bad else None
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
            return None
        if path.endswith(".json"):
            with open(path) as f:
                json.load(f)
    except Exception as exc:  # any failure to read means the file is unusable
        return f"{type(exc).__name__}: {exc}"
    return None


def missing_required(files: dict[str, int], world: int) -> Optional[str]:
    """What a checkpoint of `world` ranks lacks among the files every checkpoint has, or None."""
    required = [TRAINER_STATE, "latest"] + [f"rank-{r}.json" for r in range(world)]
    missing = [f for f in required if f not in files]
    if missing or not any(f.startswith(DS_TAG + "/") for f in files):
        return f"incomplete: missing {missing or [DS_TAG + '/']}"
    return None


def verify_checkpoint(folder: str) -> Optional[str]:
    """None when complete and readable, else why not."""
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        return f"no readable {MANIFEST} ({exc})"
    files = manifest.get("files", {})
    problem = missing_required(files, int(manifest.get("world_size", 0)))
    if problem:
        return problem
    for rel, size in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"missing file {rel}"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, manifest says {size}"
        problem = check_file(path)
        if problem:
            return f"{rel}: {problem}"
    return None


def finalize(tmp: str, final: str) -> None:
    """Atomic publish of a verified temporary folder (same filesystem)."""
    if os.path.exists(final):  # e.g. the same step written again after a restart
        shutil.rmtree(final)
    os.replace(tmp, final)


def prune_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints; returns the deleted paths."""
    removed = []
    for _, path in list_checkpoints(root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def latest_valid_checkpoint(root: str, warn: Callable[[str], None] = logger.warning) -> Optional[tuple[int, str]]:
    """The newest verified checkpoint; broken newer ones are set aside (renamed) with a warning."""
    for step, path in list_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return step, path
        aside = os.path.join(root, f"corrupt-{os.path.basename(path)}-{int(time.time())}")
        warn(f"checkpoint {path} is unusable ({problem}); set aside as {aside}, trying the previous one")
        os.replace(path, aside)
    return None
