"""Resuming a training stage on another number of workers (or another ZeRO stage).

A checkpoint's DeepSpeed files are sharded by the worker count that wrote them (each rank's slice
of the fp32 master weights and Adam moments). Before the workers of a resized run start, the driver
turns the newest checkpoint's shards into DeepSpeed's universal form (`ds_to_universal`: one folder
per parameter with its full fp32 value and moments), adds those files to the checkpoint and commits
it again; every rank of the new run then loads its own slice from them (`load_universal`). ZeRO-0
keeps the full optimizer state in one file, which loads on any worker count as it is.

Everything else in a pretraining checkpoint is already independent of the worker count: the data
cursor is global, the pruning masks and schedule position are whole, the LR is a function of the
step. Fine-tuning keeps a data cursor per worker and resumes only on the same count.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

from pipelines.atomic import file_sha256
from workers.train.checkpoint_parts import DS_TAG, UNIVERSAL
from workers.run_layout import RunLayout, TrainRunLayout
from workers.run_records import CheckpointFile, CheckpointManifest, dump_record
from workers.train.checkpointer import MANIFEST, committed_checkpoints, read_manifest


def prepare_resume(spec: Any) -> None:
    """Driver, before every attempt: set `spec.resume_universal`, converting the newest checkpoint when
    it was written by another worker count or ZeRO stage; refuse what cannot resume."""
    spec.resume_universal = False
    layout, run, cfg = spec.layout, spec.run, spec.train
    committed = committed_checkpoints(layout, run)
    if not committed:
        return
    rel = committed[0][1]
    manifest = read_manifest(layout, rel, run.stage)
    # a checkpoint written without the ZeRO stage in its manifest was written at this run's
    world, stage = manifest.world_size, cfg.zero_stage if manifest.zero_stage is None else manifest.zero_stage
    if world == cfg.num_workers and stage == cfg.zero_stage:
        return
    where = layout.store.where(rel)
    if not getattr(spec, "elastic", False):
        raise ValueError(f"{where} was written by {world} workers at ZeRO-{stage}; this run keeps a data cursor per "
                         f"worker, so it resumes only with num_workers={world} and zero_stage={stage} "
                         f"(got {cfg.num_workers}, {cfg.zero_stage})")
    if 0 in (stage, cfg.zero_stage):
        if stage != cfg.zero_stage:
            raise ValueError(f"{where} was written at ZeRO-{stage}; resuming it at ZeRO-{cfg.zero_stage} is not "
                             f"supported: set zero_stage={stage}")
        return  # ZeRO-0: the full optimizer state loads on any worker count
    make_universal(layout, run, rel, manifest)
    spec.resume_universal = True


def make_universal(layout: RunLayout, run: TrainRunLayout, rel: str, manifest: CheckpointManifest) -> None:
    """Add the universal form of checkpoint `rel`'s DeepSpeed files to it and commit it again (the
    manifest, written last, lists the new files with their sha256). Done once per checkpoint."""
    files = manifest.files
    if any(name.startswith(UNIVERSAL + "/") for name in files):
        return
    store = layout.store
    work = os.path.join(run.checkpoints, f".tmp-universal-{os.path.basename(rel)}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        ds_files = [name for name in files if name.startswith(DS_TAG + "/")]
        source = store.fetch(rel, ds_files, os.path.join(work, "in"))  # on local disk: read in place
        out = os.path.join(work, UNIVERSAL)
        _convert(os.path.join(source, DS_TAG), os.path.join(out, DS_TAG))
        with open(os.path.join(out, "latest_universal"), "w") as f:
            f.write(DS_TAG)
        added: dict[str, CheckpointFile] = {}
        for base, _, names in os.walk(out):
            for name in names:
                path = os.path.join(base, name)
                key = f"{UNIVERSAL}/{os.path.relpath(path, out)}".replace(os.sep, "/")
                added[key] = CheckpointFile(size=os.path.getsize(path), sha256=file_sha256(path))
                store.publish(path, f"{rel}/{key}")
        recommitted = manifest.model_copy(update={"files": dict(sorted({**files, **added}.items()))})
        store.write_json(f"{rel}/{MANIFEST}", dump_record(recommitted))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        store.discard_fetched(os.path.join(work, "in"))


def _convert(source: str, target: str) -> None:
    """DeepSpeed's own converter, in a process of its own (it runs a process pool)."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
           "--output_folder", target, "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if done.returncode != 0:
        raise RuntimeError(f"converting {source} to DeepSpeed's universal checkpoint failed:\n{done.stderr[-3000:]}")
