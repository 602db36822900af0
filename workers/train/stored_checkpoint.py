"""Checkpoints of a run directory on an object store, where ranks share no filesystem.

Save: every rank writes its files (DeepSpeed's shard, its cursor and RNG; rank 0 also the model
states, trainer and pruning state) to its own local staging folder, checks that they read back,
and uploads them to `<stage>/checkpoints/step-N/`. Rank 0 then compares the stored listing with
what every rank reports and writes `MANIFEST.json` last: that object is the commit, as the rename
is on a local disk. Resume downloads one rank's share of the newest committed checkpoint (the
shared files and its own, never the other ranks' optimizer shards).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from typing import Callable, Optional

from workers.storage import RunStore, parallel
from workers.train import checkpoint as ckpt

_STEP_MANIFEST = re.compile(r"^step-(\d+)/" + re.escape(ckpt.MANIFEST) + "$")
# files only one rank loads: ours (rank-3.json) and DeepSpeed's ZeRO shards (bf16_zero_pp_rank_3_...)
_RANK_FILE = re.compile(r"(?:^|/)rank-(\d+)\.|zero_pp_rank_(\d+)_")


def staged_files(folder: str) -> dict[str, int]:
    """A rank's staged files -> size, after checking each reads back (zip CRCs, safetensors, JSON)."""
    files = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            problem = ckpt.check_file(path)
            if problem:
                raise RuntimeError(f"checkpoint file {path} does not read back: {problem}")
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    return files


def upload(store: RunStore, folder: str, rel_step: str, files: dict[str, int]) -> None:
    """A rank's staged files straight to their final names in the stored step folder."""
    parallel(lambda name: store.upload(f"{rel_step}/{name}", os.path.join(folder, name)), list(files))


def commit(store: RunStore, rel_step: str, step: int, world: int, reported: list[dict[str, int]]) -> Optional[str]:
    """Rank 0: check the stored step folder against what the ranks wrote; write MANIFEST.json last.
    Returns None when committed, else why not."""
    files: dict[str, int] = {}
    for part in reported:
        files.update(part)
    problem = ckpt.missing_required(files, world)
    if problem:
        return problem
    stored = {name: size for name, (size, _) in store.listing(rel_step).items()}
    for name, size in files.items():
        if stored.get(name) != size:
            return f"{name}: stored {stored.get(name)} bytes, rank wrote {size}"
    manifest = {"step": step, "world_size": world, "created": time.time(), "files": dict(sorted(files.items()))}
    store.write_json(f"{rel_step}/{ckpt.MANIFEST}", manifest)
    return None


def committed(store: RunStore, rel_root: str) -> list[tuple[int, str]]:
    """Committed (MANIFEST.json present) stored checkpoints, newest first: (step, relative path)."""
    found = []
    for name in store.listing(rel_root):
        m = _STEP_MANIFEST.match(name)
        if m:
            found.append((int(m.group(1)), f"{rel_root}/{ckpt.step_dir_name(int(m.group(1)))}"))
    return sorted(found, reverse=True)


def prune(store: RunStore, rel_root: str, keep: int) -> None:
    for _, rel in committed(store, rel_root)[keep:]:
        store.delete(rel)


def read_stored_manifest(store: RunStore, rel_step: str) -> dict:
    manifest = store.read_json(f"{rel_step}/{ckpt.MANIFEST}")
    if not isinstance(manifest, dict):
        raise ValueError(f"{ckpt.MANIFEST} is not a JSON object")
    return manifest


def verify_stored(store: RunStore, rel_step: str) -> Optional[str]:
    """Cheap check before anyone downloads: the manifest reads and every file has its size."""
    try:
        manifest = read_stored_manifest(store, rel_step)
    except (OSError, ValueError, RuntimeError) as exc:
        return f"no readable {ckpt.MANIFEST} ({exc})"
    stored = {name: size for name, (size, _) in store.listing(rel_step).items()}
    for name, size in manifest.get("files", {}).items():
        if stored.get(name) != size:
            return f"{name}: stored {stored.get(name)} bytes, manifest says {size}"
    return ckpt.missing_required(manifest.get("files", {}), int(manifest.get("world_size", 0)))


def fetch(store: RunStore, rel_step: str, rank: int, dest: str) -> Optional[str]:
    """Download the files rank `rank` loads into `dest` and check they read back; None when usable."""
    manifest = read_stored_manifest(store, rel_step)
    shutil.rmtree(dest, ignore_errors=True)
    for name in manifest["files"]:
        m = _RANK_FILE.search(name)
        owner = next((int(g) for g in m.groups() if g is not None), None) if m else None
        if owner is not None and owner != rank:
            continue
        path = os.path.join(dest, name)
        store.download(f"{rel_step}/{name}", target=path)
        if os.path.getsize(path) != manifest["files"][name]:
            return f"{name}: downloaded {os.path.getsize(path)} bytes, manifest says {manifest['files'][name]}"
        problem = ckpt.check_file(path)
        if problem:
            return f"{name}: {problem}"
    return None


def set_aside(store: RunStore, rel_step: str, reason: str, warn: Callable[[str], None]) -> None:
    """A committed checkpoint that does not load: un-commit it (its manifest moves to CORRUPT.json)."""
    try:
        manifest = read_stored_manifest(store, rel_step)
    except (OSError, ValueError, RuntimeError):
        manifest = {}
    store.write_json(f"{rel_step}/CORRUPT.json", {"reason": reason, "manifest": manifest, "time": time.time()})
    store.delete(f"{rel_step}/{ckpt.MANIFEST}")
    warn(f"checkpoint {store.where(rel_step)} is unusable ({reason}); un-committed it, trying the previous one")
