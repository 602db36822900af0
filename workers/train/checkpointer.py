"""One checkpointer for every training worker (pretraining and fine-tuning), on any run store.

A checkpoint is `<run>/checkpoints/step-NNNNNNNN/`, made of named parts:

    deepspeed/ ...                      the engine (model, optimizer; ZeRO shards per rank)
    <part>.json / <part>.safetensors    parts saved once by rank 0 (train state, LR position, pruning)
    rank-<r>.<part>.json / .safetensors parts every rank saves for itself (data cursor, RNG)
    MANIFEST.json                       the commit: every file with its size and sha256, written last

Save: each rank writes its parts to its own staging folder on this node, checks that they read
back, hashes them and publishes them into the step folder (a rename on local disk, an upload to an
object store). Rank 0 then checks the stored folder against what every rank reports and writes
MANIFEST.json; a step folder without it is never loaded. The newest `keep` are kept.

Restore: rank 0 picks the newest committed checkpoint whose files are all there; every rank fetches
its share (the shared files and its own: never the other ranks' optimizer shards), checks each
file's sha256 before anything is unpickled, and loads. A checkpoint that fails anywhere is
set aside (un-committed, then moved to `corrupt-step-N-<time>` with its files: undo by renaming
it back and restoring MANIFEST.json from CORRUPT.json) and the previous one is tried.

Adding a part is one entry in the worker's `parts`/`rank_parts` mapping.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from typing import Any, Callable, Mapping, Optional

from safetensors import safe_open

from pipelines.atomic import file_sha256
from workers.run_layout import RunLayout, StorageError, TrainRunLayout
from workers.run_records import (CheckpointFile, CheckpointManifest, CorruptRecord, RecordError, dump_record,
                                 parse_record)
from workers.train.checkpoint_parts import DS_TAG, UNIVERSAL, EnginePart, Stateful, load_state, save_state
from workers.train.context import barrier, broadcast_from_rank0, gather

logger = logging.getLogger("pofa.train")

MANIFEST = "MANIFEST.json"
CORRUPT = "CORRUPT.json"
FORMAT = 2  # 2: named parts with sha256 per file
READ_ATTEMPTS, READ_RETRY_S = 3, 1.0  # a checkpoint is set aside only when it fails to read this many times
_STEP = re.compile(r"^step-(\d{8})$")
# files only one rank loads: ours (rank-3.data.json) and DeepSpeed's ZeRO shards (zero_pp_rank_3_...)
_RANK_FILE = re.compile(r"(?:^|/)rank-(\d+)\.|zero_pp_rank_(\d+)_")


class CheckpointError(RuntimeError):
    pass


def file_owner(name: str) -> Optional[int]:
    """The rank a checkpoint file belongs to, None for files every rank loads."""
    m = _RANK_FILE.search(name)
    return next((int(g) for g in m.groups() if g is not None), None) if m else None


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
        elif path.endswith(".json"):
            with open(path) as f:
                json.load(f)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
        return f"{type(exc).__name__}: {exc}"
    return None


def _walk(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(base, n), folder).replace(os.sep, "/")
                  for base, _, names in os.walk(folder) for n in names)


def committed_checkpoints(layout: RunLayout, run: TrainRunLayout) -> list[tuple[int, str]]:
    """(step, folder relative to the run directory) of a training run's committed checkpoints (those
    with a MANIFEST.json), newest first. Read from the store's listing: no engine, no parts needed."""
    root = layout.rel(run.checkpoints)
    found = []
    for name in layout.store.listing(root):
        folder, _, leaf = name.partition("/")
        m = _STEP.match(folder)
        if m and leaf == MANIFEST:
            found.append((int(m.group(1)), f"{root}/{folder}"))
    return sorted(found, reverse=True)


def read_manifest(layout: RunLayout, rel_step: str, stage: str) -> CheckpointManifest:
    """A committed checkpoint's MANIFEST.json; CheckpointError when another pofa version wrote it or a
    field is missing or invalid (never set aside: it names the file, the field and the `stage` to redo).
    An unreadable file (not JSON, not there) raises ValueError/OSError as the store does."""
    where = f"{layout.store.where(rel_step)}/{MANIFEST}"
    raw = layout.store.read_json(f"{rel_step}/{MANIFEST}")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f"{where}: written by another pofa version "
                              f"(format {raw.get('format') if isinstance(raw, dict) else '?'}, "
                              f"this pofa reads {FORMAT})")
    try:
        return parse_record(CheckpointManifest, raw, where, stage)
    except RecordError as exc:
        raise CheckpointError(str(exc)) from None


class Checkpointer:
    """`parts`: saved once (rank 0) and loaded by every rank; `rank_parts`: one copy per rank. Parts
    that are None (e.g. no pruning in the teacher) are left out."""

    def __init__(self, layout: RunLayout, run: TrainRunLayout, rank: int, world: int, keep: int,
                 engine: Optional[EnginePart], parts: Mapping[str, Optional[Stateful]],
                 rank_parts: Mapping[str, Optional[Stateful]], warn: Callable[[str], None] = logger.warning,
                 meta: Optional[Mapping[str, Any]] = None) -> None:
        self.layout, self.run = layout, run
        self.rank, self.world, self.keep = rank, world, keep
        self.meta = dict(meta or {})  # recorded in the manifest: ZeRO stage, precision, global batch
        self.engine = engine
        self.parts = {k: v for k, v in parts.items() if v is not None}
        self.rank_parts = {k: v for k, v in rank_parts.items() if v is not None}
        self.warn = warn
        self.root = layout.rel(run.checkpoints)

    # -- listing ----------------------------------------------------------------------------------
    def committed(self) -> list[tuple[int, str]]:
        """(step, path relative to the run) of committed checkpoints, newest first."""
        return committed_checkpoints(self.layout, self.run)

    def manifest(self, rel_step: str) -> CheckpointManifest:
        return read_manifest(self.layout, rel_step, self.run.stage)

    def _required(self, world: int) -> list[str]:
        required = [f"{p}.json" for p in self.parts]
        required += [f"rank-{r}.{p}.json" for r in range(world) for p in self.rank_parts]
        return required

    def verify(self, rel_step: str) -> Optional[str]:
        """Cheap check before anyone downloads: the manifest reads, it has this run's parts, and every
        file is stored with its size. None when usable."""
        try:
            manifest = self.manifest(rel_step)
        except CheckpointError:
            raise
        except (OSError, ValueError, StorageError) as exc:  # unreadable: not usable
            return f"no readable {MANIFEST} ({exc})"
        files = manifest.files
        missing = [f for f in self._required(manifest.world_size) if f not in files]
        if self.engine is not None and not any(f.startswith(DS_TAG + "/") for f in files):
            missing.append(DS_TAG + "/")
        if missing:
            return f"incomplete: missing {missing}"
        stored = {name: size for name, (size, _) in self.layout.store.listing(rel_step).items()}
        for name, info in files.items():
            if stored.get(name) != info.size:
                return f"{name}: stored {stored.get(name)} bytes, manifest says {info.size}"
        return None

    # -- save -------------------------------------------------------------------------------------
    def _staging(self, step: int, what: str) -> str:
        return os.path.join(self.run.checkpoints, f".{what}-step-{step:08d}.rank-{self.rank}")

    def _write_parts(self, folder: str, step: int) -> None:
        if self.engine is not None:
            self.engine.save(folder, step)  # collective
        if self.rank == 0:
            for name, part in self.parts.items():
                save_state(folder, name, part.state_dict())
        for name, part in self.rank_parts.items():
            save_state(folder, f"rank-{self.rank}.{name}", part.state_dict())

    def save(self, step: int) -> str:
        """Every rank: write, publish and commit the checkpoint of `step`; returns where it is."""
        rel_step = self.layout.rel(self.run.checkpoint_step(step))
        staging = self._staging(step, "tmp")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        if self.rank == 0:
            self._clear_step(rel_step)
        barrier()
        problem: Optional[str] = None
        files: dict[str, CheckpointFile] = {}
        try:
            self._write_parts(staging, step)
            for name in _walk(staging):
                path = os.path.join(staging, name)
                bad = check_file(path)
                if bad:
                    raise CheckpointError(f"checkpoint file {name} does not read back: {bad}")
                files[name] = CheckpointFile(size=os.path.getsize(path), sha256=file_sha256(path))
            for name in files:
                self.layout.store.publish(os.path.join(staging, name), f"{rel_step}/{name}")
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            problem, files = f"rank {self.rank}: {type(exc).__name__}: {exc}", {}
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        reported = gather({"problem": problem, "files": files})
        if self.rank == 0:
            problem = next((r["problem"] for r in reported if r["problem"]), None)
            if problem is None:
                problem = self._commit(rel_step, step, [r["files"] for r in reported])
            if problem is None:
                for _, old in self.committed()[self.keep:]:
                    self.layout.store.delete(old)
                self._remove_stale(rel_step)
        problem = broadcast_from_rank0(problem)
        if problem is not None:
            raise CheckpointError(f"checkpoint at step {step} was not committed: {problem}")
        self._remove_own_leftovers()
        return self.layout.store.where(rel_step)

    def _remove_stale(self, rel_step: str) -> None:
        """Rank 0, after a commit: folders that can never be loaded go (uncommitted steps a crash left,
        checkpoints set aside earlier), in the store and on this node."""
        keep = {rel.rsplit("/", 1)[1] for _, rel in self.committed()}
        here = os.listdir(self.run.checkpoints) if os.path.isdir(self.run.checkpoints) else []
        for folder in sorted({name.split("/", 1)[0] for name in self.layout.store.listing(self.root)} | set(here)):
            stale = folder.startswith("corrupt-step-") or (_STEP.match(folder) and folder not in keep)
            if stale and f"{self.root}/{folder}" != rel_step:
                self.layout.store.delete(f"{self.root}/{folder}")
                shutil.rmtree(os.path.join(self.run.checkpoints, folder), ignore_errors=True)

    def _remove_own_leftovers(self) -> None:
        """Every rank: staging folders of its own that a crash left on this node."""
        mine = re.compile(rf"^\.(tmp|restore)-step-\d{{8}}\.rank-{self.rank}$")
        if os.path.isdir(self.run.checkpoints):
            for name in os.listdir(self.run.checkpoints):
                if mine.match(name):
                    shutil.rmtree(os.path.join(self.run.checkpoints, name), ignore_errors=True)

    def _clear_step(self, rel_step: str) -> None:
        """The same step written again after a restart starts from an empty folder; one that was set
        aside (a crash before it was moved) is moved aside, never deleted."""
        names = self.layout.store.listing(rel_step)
        if CORRUPT in names:
            self._move_aside(rel_step)
        elif names:
            self.layout.store.delete(rel_step)

    def _commit(self, rel_step: str, step: int, reported: list[dict[str, CheckpointFile]]) -> Optional[str]:
        """Rank 0: the stored folder must hold exactly what the ranks wrote; then MANIFEST.json."""
        files: dict[str, CheckpointFile] = {}
        for rank, part in enumerate(reported):
            for name, info in part.items():
                if name in files and files[name].sha256 != info.sha256:
                    return f"{name} was written differently by two ranks (the last one was rank {rank})"
                files[name] = info
        stored = {name: size for name, (size, _) in self.layout.store.listing(rel_step).items()}
        for name, info in files.items():
            if stored.get(name) != info.size:
                return f"{name}: stored {stored.get(name)} bytes, rank wrote {info.size}"
        manifest = CheckpointManifest(format=FORMAT, step=step, world_size=self.world, created=time.time(),
                                      parts=sorted(self.parts), rank_parts=sorted(self.rank_parts), **self.meta,
                                      files=dict(sorted(files.items())))
        missing = [f for f in self._required(self.world) if f not in files]
        if missing:
            return f"incomplete: missing {missing}"
        lost = self.layout.store.lease_problem()  # a run taken over elsewhere is never written to
        if lost:
            return lost
        self.layout.store.write_json(f"{rel_step}/{MANIFEST}", dump_record(manifest))
        return None

    # -- restore ----------------------------------------------------------------------------------
    def restore(self) -> Optional[tuple[int, str]]:
        """Every rank: load the newest usable checkpoint; (step, where) or None when there is none."""
        while True:
            decided: tuple[Optional[str], Optional[str]] = (None, None)  # (checkpoint, fatal error)
            if self.rank == 0:
                decided = self._choose()
            choice, fatal = broadcast_from_rank0(decided)
            if fatal is not None:
                raise CheckpointError(fatal)  # on every rank: none may wait for the others
            if choice is None:
                return None
            manifest = self.manifest(choice)
            mine = self._my_files(choice, manifest)
            for attempt in range(READ_ATTEMPTS):  # the same count on every rank: the gathers stay in step
                folder, problems = self._fetch(choice, manifest.step, mine)
                if not problems:
                    try:
                        self._load_parts(folder)
                    finally:
                        self.layout.store.discard_fetched(folder)  # DeepSpeed holds it in memory now
                    return manifest.step, self.layout.store.where(choice)
                self.layout.store.discard_fetched(folder)
                if attempt + 1 < READ_ATTEMPTS:  # a read error may pass: only a repeated one sets it aside
                    self.warn(f"checkpoint {self.layout.store.where(choice)} did not read back ({problems[0]}); "
                              f"reading it again")
                    time.sleep(READ_RETRY_S * (attempt + 1))
            if self.rank == 0:
                self.set_aside(choice, "; ".join(problems))

    def _my_files(self, choice: str, manifest: CheckpointManifest) -> dict[str, CheckpointFile]:
        """The files this rank loads: the shared ones and its own. On another worker count (elastic)
        the engine comes from the universal form and the old ranks' shards are not read; a rank that
        did not exist then starts its own parts (RNG) afresh."""
        files, world = manifest.files, manifest.world_size
        if world == self.world:
            return {n: i for n, i in files.items() if file_owner(n) in (None, self.rank)}
        where = self.layout.store.where(choice)
        if self.rank_parts.keys() - {"rng"}:
            raise CheckpointError(f"{where} was written by {world} workers: this run keeps a data "
                                  f"cursor per worker, so it resumes only with num_workers={world} "
                                  f"(got {self.world})")
        universal = [n for n in files if n.startswith(UNIVERSAL + "/")]
        if self.engine is not None and self.engine.universal != bool(universal):
            raise CheckpointError(f"{where} was written by {world} workers and has "
                                  f"{'a' if universal else 'no'} universal form; this run has {self.world} workers "
                                  "(the driver converts the newest checkpoint before the workers start)")
        skip = DS_TAG + "/" if universal else None
        return {n: i for n, i in files.items()
                if file_owner(n) in (None, self.rank) and not (skip and n.startswith(skip))}

    def _fetch(self, choice: str, step: int, mine: Mapping[str, CheckpointFile]) -> tuple[str, list[str]]:
        """This rank's share into a local folder, checked; the problems every rank found."""
        folder = self._staging(step, "restore")
        problem = None
        try:
            folder = self.layout.store.fetch(choice, list(mine), folder)
            problem = _check_fetched(folder, mine)
        except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
            problem = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        return folder, [p for p in gather(problem) if p]

    def _choose(self) -> tuple[Optional[str], Optional[str]]:
        """Rank 0: the newest committed checkpoint that verifies; broken ones are set aside."""
        try:
            for _, rel in self.committed():
                problem = self.verify(rel)
                for attempt in range(1, READ_ATTEMPTS):  # a passing read error must not set a good one aside
                    if problem is None:
                        break
                    time.sleep(READ_RETRY_S * attempt)
                    problem = self.verify(rel)
                if problem is None:
                    return rel, None
                self.set_aside(rel, problem)
        except CheckpointError as exc:  # another pofa version's checkpoint: never set aside, never loaded
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - the other ranks wait on this answer: never leave them hanging
            return None, f"could not choose a checkpoint in {self.layout.store.where(self.root)}: {exc}"
        return None, None

    def _load_parts(self, folder: str) -> None:
        if self.engine is not None:
            self.engine.load(folder)  # collective
        for name, part in self.parts.items():
            part.load_state_dict(load_state(folder, name))
        for name, part in self.rank_parts.items():  # RNG last among them: nothing draws after it
            if os.path.exists(os.path.join(folder, f"rank-{self.rank}.{name}.json")):  # absent: a new rank
                part.load_state_dict(load_state(folder, f"rank-{self.rank}.{name}"))

    def set_aside(self, rel_step: str, reason: str) -> None:
        """Un-commit a checkpoint that does not load, then move it aside, files and all: MANIFEST.json
        becomes CORRUPT.json (with the reason) and `step-N` becomes `corrupt-step-N-<time>`. Undo by
        renaming both back."""
        try:
            manifest = self.layout.store.read_json(f"{rel_step}/{MANIFEST}")
        except Exception:  # noqa: BLE001 - an unreadable manifest is itself the problem
            manifest = None
        corrupt = CorruptRecord(reason=reason, manifest=manifest, time=time.time())
        self.layout.store.write_json(f"{rel_step}/{CORRUPT}", dump_record(corrupt))
        self.layout.store.delete(f"{rel_step}/{MANIFEST}")  # never loaded from here on, even if the move fails
        aside = self._move_aside(rel_step)
        self.warn(f"checkpoint {self.layout.store.where(rel_step)} is unusable ({reason}); set aside as "
                  f"{self.layout.store.where(aside)}, trying the previous one")

    def _move_aside(self, rel_step: str) -> str:
        parent, name = rel_step.rsplit("/", 1)
        aside = f"{parent}/corrupt-{name}-{int(time.time() * 1000)}"
        self.layout.store.move(rel_step, aside)
        return aside


def _check_fetched(folder: str, files: Mapping[str, CheckpointFile]) -> Optional[str]:
    """Every file this rank loads has the size and sha256 the commit recorded (before any unpickling)."""
    for name, info in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != info.size:
            return f"{name}: {os.path.getsize(path)} bytes, the manifest says {info.size}"
        if file_sha256(path) != info.sha256:
            return f"{name}: sha256 differs from the one recorded at commit"
    return None
