"""The run directory: one folder per run holding everything needed to resume it.

Its paths are `workers.run_layout.RunLayout`'s. A local or shared-filesystem path is used as is. An
object store URI (`s3://bucket/prefix`) is the durable copy, and the process works on this node's
mirror of it: `path` is then the mirror, `where` the URI.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from typing import IO, Any, Callable, Optional

import yaml

from pipelines.atomic import write_text_atomic
from workers.run_layout import RunLayout
from workers.storage import StorageError, is_uri
from orchestrator.recipe.load import dump_recipe
from orchestrator.recipe.schema import Recipe
from pipelines.config_keys import changed_keys, operational_paths

DEFAULT_ROOT = "runs"


class RunDirError(RuntimeError):
    pass


LOCK_PATH_PREFIX = "at "  # the lock file's second line: where the holder opened the run directory


def lock_holder(text: str) -> tuple[str, Optional[str]]:
    """(who holds the lock, the path it opened the run at) from the lock file's lines."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    holder = lines[0] if lines else "another process"
    at = next((ln[len(LOCK_PATH_PREFIX):] for ln in lines[1:] if ln.startswith(LOCK_PATH_PREFIX)), None)
    return holder, at


def choose_run_dir(recipe: Recipe, explicit: Optional[str], root: str = DEFAULT_ROOT) -> str:
    """--run-dir, else the recipe's run_dir, else the newest ./runs/<name>-* whose result-defining
    settings are this recipe's (so rerunning the same command resumes it, with other workers or
    checkpoint cadence too), else a new ./runs/<name>-<timestamp> (a changed learning rate starts a
    new run; the old one is kept as it is)."""
    chosen = explicit or recipe.run_dir
    if chosen and is_uri(chosen):
        return chosen  # an object store: named explicitly, never guessed
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    root = os.path.abspath(root)
    if os.path.isdir(root):
        mine = recipe.model_dump(mode="json")
        for entry in sorted(os.listdir(root), reverse=True):
            path = os.path.join(root, entry)
            text = _read(RunLayout.open(path).recipe) if entry.startswith(recipe.name + "-") else None
            if text is not None and not changed_keys(yaml.safe_load(text) or {}, mine,
                                                     ignore=operational_paths(Recipe)):
                return path
    base = os.path.join(root, f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while os.path.exists(path):  # two runs started within the same second
        n += 1
        path = f"{base}-{n}"
    return path


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class RunDir:
    """The run directory seen by the driver: its layout (every path), the lock or lease that keeps a
    second pofa process out, and the syncs with the store at run start and stage ends."""

    def __init__(self, path: str):
        try:
            self.layout = RunLayout.open(path)
        except StorageError as exc:  # a malformed URI
            raise RunDirError(str(exc)) from None
        self.store = self.layout.store
        self.path = self.layout.root
        self.where = self.layout.where
        self._lock: Optional[IO[str]] = None
        self._lease: Any = None  # orchestrator.lease.Lease while held (object stores)

    def sync_down(self) -> int:
        """Bring this node's copy up to date with the store (a rerun on another node, or after the
        copy was lost); prunes files the store no longer has. Returns the number of files fetched."""
        try:
            return self.layout.pull(self.path, prune=True)
        except StorageError as exc:
            raise RunDirError(str(exc)) from None

    def sync_up(self, path: Optional[str] = None) -> int:
        """This node's new or changed files under `path` (default: the whole run) to the store,
        manifests last."""
        self.check_lease()
        try:
            return self.layout.push(path)
        except StorageError as exc:
            raise RunDirError(str(exc)) from None

    def stage_dir(self, stage: str) -> str:
        return self.layout.stage_dir(stage)

    def acquire(self, console: Callable[[str], None] = print) -> None:
        """One pofa process per run directory: a second one stops here instead of corrupting the first.
        On an object store also: the store must take writes (checked before any cluster work), and
        a lease keeps processes on other machines out."""
        self._lock_local()
        if not self.store.remote:  # a local or shared filesystem: the file lock is the guard
            return
        from orchestrator.lease import Lease, LeaseHeld

        try:
            self.store.check_writable()
            lease = Lease(self.store, console)
            lease.acquire()
        except (StorageError, LeaseHeld) as exc:
            self.release()
            raise RunDirError(str(exc)) from None
        self._lease = lease
        # the layout the stages and workers get carries the lease: their commits check it is still ours
        self.layout = RunLayout(dataclasses.replace(self.store, lease_token=lease.token))
        self.store = self.layout.store

    def check_lease(self) -> None:
        """Before committing anything (a stage's manifest, the store sync): this process still holds
        the run. One that lost it (stalled past the expiry, another machine took over) stops here."""
        problem = ((self._lease.lost if self._lease is not None else None) or self.store.lease_problem()
                   or self._moved())
        if problem:
            raise RunDirError(f"run directory {self.where}: {problem}; this process stops without committing "
                              "anything more")

    def _moved(self) -> Optional[str]:
        """Why this process no longer holds the folder it locked: it was moved (or removed) meanwhile, so
        what the run writes would go to a path that is no longer the run's."""
        if self._lock is None:
            return None
        held = os.fstat(self._lock.fileno())
        try:
            here = os.stat(self.layout.lock)
        except FileNotFoundError:
            here = None
        if here is None or (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
            return "was moved or removed while this run held it"
        return None

    def _lock_local(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        f = open(self.layout.lock, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder, opened_at = lock_holder(f.read())
            f.close()
            if opened_at and opened_at != self.path:
                raise RunDirError(f"run directory {self.path} is in use by {holder}, which opened it at {opened_at}: "
                                  "the folder was moved while that run holds it, and that run stops at its next "
                                  "stage end without committing anything here; wait for it to stop (or stop it), "
                                  "then rerun here to resume") from None
            raise RunDirError(f"run directory {self.path} is in use by {holder}; wait for it to finish "
                              "or choose another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n{LOCK_PATH_PREFIX}{self.path}\n")
        f.flush()
        self._lock = f

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def check_recipe(self, recipe: Recipe, force: bool) -> None:
        """A run directory belongs to one recipe (by name): refuse another unless --force."""
        existing = _read(self.layout.recipe)
        if existing is None or force:
            return
        previous = (yaml.safe_load(existing) or {}).get("name")
        if previous != recipe.name:
            raise RunDirError(f"run directory {self.path} belongs to recipe {previous!r}, not {recipe.name!r}: "
                              "use a new --run-dir, or --force to redo it with this recipe")

    def write_recipe(self, recipe: Recipe) -> None:
        write_text_atomic(dump_recipe(recipe), self.layout.recipe)
