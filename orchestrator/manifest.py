"""Stage manifests: what a stage made, from what, and how to tell that it is still valid.

A stage is complete only when `<run>/<stage>/manifest.json` exists, its fingerprint equals the one the
current recipe and inputs give, and every output file listed is present with the recorded hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Optional

from pipelines.atomic import file_sha256, write_json_atomic

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when a stage's output format changes: old outputs are then redone


def fingerprint(obj: Any) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "what": obj}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_manifest(stage_dir: str) -> Optional[dict[str, Any]]:
    try:
        with open(os.path.join(stage_dir, MANIFEST)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def why_stale(stage_dir: str, expected_fingerprint: str) -> Optional[str]:
    """None when the stage's outputs are complete and current, else the reason to redo it."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return "no manifest"
    if manifest.get("fingerprint") != expected_fingerprint:
        return "its recipe section or inputs changed"
    for rel, digest in manifest.get("outputs", {}).items():
        path = os.path.join(stage_dir, rel)
        if not os.path.isfile(path):
            return f"output {rel} is missing"
        if file_sha256(path) != digest:
            return f"output {rel} changed"
    return None


def write_manifest(stage_dir: str, stage: str, fp: str, inputs: dict[str, Any], config: dict[str, Any],
                   stats: dict[str, Any], outputs: dict[str, str], started: float) -> dict[str, Any]:
    from orchestrator import __version__

    manifest = {
        "stage": stage,
        "status": "complete",
        "fingerprint": fp,
        "inputs": inputs,
        "config": config,
        "stats": {**stats, "fingerprint": fp},
        "outputs": dict(sorted(outputs.items())),
        "started": started,
        "finished": time.time(),
        "wall_time_s": round(time.time() - started, 3),
        "pofa_version": __version__,
    }
    write_json_atomic(manifest, os.path.join(stage_dir, MANIFEST))
    return manifest
