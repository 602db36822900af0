"""The pretraining data as MLflow datasets: where it came from, a digest of its shards, split sizes.

Built from the preprocess manifest alone (its config names the source, its outputs hash every shard), so
no data is read and MLflow's dataset classes, which would load it, are not needed: the entity is made
directly. The run's Dataset column then tells runs on other data, or other shards, apart.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from workers.run_layout import SPLITS
from workers.stage_outputs import PreprocessOutput, StageManifest

# MLflow's context tag for a dataset input, as `mlflow.log_input(context=...)` sets it.
CONTEXT_TAG = "mlflow.data.context"
_CONTEXT = {"train": "training", "validation": "validation"}


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    digest: str
    source_type: str
    source: str  # JSON, in the form of MLflow's source of that type
    profile: str  # JSON: rows, shards, documents, sequence length, masking
    context: str


def pretraining_datasets(manifest: StageManifest) -> list[DatasetRecord]:
    """One record per split of a finished preprocess stage."""
    output = PreprocessOutput.model_validate(manifest.output)
    source = manifest.config.get("preprocess", {}).get("source", {})
    source_type, source_json = _source(source)
    records = []
    for split in SPLITS:
        if split not in output.splits:
            continue
        shards = {k: v for k, v in sorted(manifest.outputs.items()) if k.startswith(f"{split}/")}
        digest = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]
        profile = {"num_rows": output.splits[split].rows, "shards": len(output.splits[split].shards),
                   "documents": manifest.stats.get(f"documents_{split}"), "max_seq_length": output.max_seq_length,
                   "masking": output.masking.model_dump(mode="json"), "files": f"preprocess/{split}"}
        records.append(DatasetRecord(name=f"pretraining-{split}", digest=digest, source_type=source_type,
                                     source=source_json, profile=json.dumps(profile, sort_keys=True),
                                     context=_CONTEXT[split]))
    return records


def _source(source: dict[str, Any]) -> tuple[str, str]:
    """(source type, source JSON): a hub dataset as MLflow's `hugging_face` source, files by their path as
    the recipe gives it (`pkg://...` stays as is: no machine's absolute path)."""
    if source.get("kind") == "hf_dataset" and not source.get("path"):
        return "hugging_face", json.dumps({"path": source.get("name"), "config_name": source.get("config"),
                                           "split": source.get("split"), "revision": source.get("revision")})
    return "local", json.dumps({"uri": source.get("path"), "kind": source.get("kind")})


def to_inputs(records: list[DatasetRecord]) -> list[Any]:
    """MLflow `DatasetInput`s of the records (imports MLflow: call from the tracking session only)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(name=r.name, digest=r.digest, source_type=r.source_type, source=r.source,
                                 profile=r.profile), tags=[InputTag(CONTEXT_TAG, r.context)]) for r in records]
