"""Stage fingerprints, and how to tell that a finished stage is still valid.

A stage is complete only when `<run>/<stage>/manifest.json` exists (`workers.stage_outputs`), its
result-defining config and inputs are the current ones, and every output file listed is present with
the recorded hash (`orchestrator.plan` decides from these).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Optional

from pydantic import BaseModel

from pipelines.atomic import file_sha256
from workers.run_layout import RunLayout
from workers.stage_outputs import MANIFEST_FORMAT, ManifestError, StageManifest, load_manifest, write_manifest

FINGERPRINT_FORMAT = 1  # bump when a stage's outputs change meaning: old outputs are then redone


def fingerprint(obj: Any) -> str:
    blob = json.dumps({"format": FINGERPRINT_FORMAT, "what": obj}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def stage_fingerprint(layout: RunLayout, stage: str) -> Optional[str]:
    """The fingerprint a finished stage recorded (None: not finished, or unreadable): a downstream
    stage's inputs, so redoing one makes those after it stale."""
    try:
        manifest = load_manifest(layout, stage)
    except ManifestError:
        return None
    return manifest.fingerprint if manifest else None


def outputs_problem(layout: RunLayout, stage: str, manifest: StageManifest) -> Optional[str]:
    """None when every output the manifest lists is present with its recorded hash, else what is wrong."""
    for rel, digest in manifest.outputs.items():
        path = layout.path(stage, rel)
        if not os.path.isfile(path):
            return f"output {rel} is missing"
        if file_sha256(path) != digest:
            return f"output {rel} changed"
    return None


def write_stage_manifest(layout: RunLayout, stage: str, fp: str, inputs: dict[str, Any], config: dict[str, Any],
                         stats: dict[str, Any], outputs: dict[str, str], output: BaseModel,
                         started: float) -> StageManifest:
    from orchestrator import __version__

    finished = time.time()
    manifest = StageManifest(format=MANIFEST_FORMAT, stage=stage, status="complete", fingerprint=fp, inputs=inputs,
                             config=config, stats={**stats, "fingerprint": fp}, outputs=dict(sorted(outputs.items())),
                             output=output.model_dump(mode="json"), started=started, finished=finished,
                             wall_time_s=round(finished - started, 3), pofa_version=__version__)
    write_manifest(layout, manifest, type(output))
    return manifest
