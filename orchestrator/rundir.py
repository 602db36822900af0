"""The run directory: one folder per run holding everything needed to resume it.

Layout: recipe.yaml (resolved), <stage>/ with the stage's outputs and manifest.json, .lock while a
pofa process works in it. Paths handed out are always inside the run directory.

A local or shared-filesystem path is used as is. An object store URI (`s3://bucket/prefix`) is the
durable copy, and the process works on this node's mirror of it (`workers.storage.RunStore`):
`path` is then the mirror, `where` the URI.
"""
from __future__ import annotations

import fcntl
import os
import time
from typing import IO, Any, Callable, Optional

import yaml

from pipelines.atomic import write_text_atomic
from workers.storage import RunStore, StorageError, except_checkpoints, is_uri
from orchestrator.recipe.load import dump_recipe
from orchestrator.recipe.schema import Recipe

DEFAULT_ROOT = "runs"


class RunDirError(RuntimeError):
    pass


def choose_run_dir(recipe: Recipe, explicit: Optional[str], root: str = DEFAULT_ROOT) -> str:
    """--run-dir, else the recipe's run_dir, else the newest ./runs/<name>-* made from this same recipe
    (so rerunning the same command resumes it), else a new ./runs/<name>-<timestamp>."""
    chosen = explicit or recipe.run_dir
    if chosen and is_uri(chosen):
        return chosen  # an object store: named explicitly, never guessed
    if chosen:
        return os.path.abspath(os.path.expanduser(chosen))
    root = os.path.abspath(root)
    if os.path.isdir(root):
        mine = dump_recipe(recipe)
        for entry in sorted(os.listdir(root), reverse=True):
            path = os.path.join(root, entry)
            if entry.startswith(recipe.name + "-") and _read(os.path.join(path, "recipe.yaml")) == mine:
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
    def __init__(self, path: str):
        try:
            self.store = RunStore.open(path)
        except StorageError as exc:  # a malformed URI
            raise RunDirError(str(exc)) from None
        self.path = self.store.local
        self.where = self.store.display
        self._lock: Optional[IO[str]] = None
        self._lease: Any = None  # orchestrator.lease.Lease while held (object stores)

    def sync_down(self) -> int:
        """Object store: bring this node's mirror up to date (a rerun on another node, or after the
        mirror was lost). Returns the number of files fetched."""
        try:
            return self.store.pull(exclude=except_checkpoints, prune=True)
        except StorageError as exc:
            raise RunDirError(str(exc)) from None

    def sync_up(self, rel: str = "") -> int:
        """The mirror's new or changed files under `rel` to the store, manifests last."""
        try:
            return self.store.push(rel, exclude=except_checkpoints)
        except StorageError as exc:
            raise RunDirError(str(exc)) from None

    def clear_remote(self, rel: str) -> None:
        """A stage redone from scratch: its stored outputs and checkpoints go too."""
        try:
            self.store.delete(rel)
        except StorageError as exc:
            raise RunDirError(str(exc)) from None

    def inside(self, *parts: str) -> str:
        """A path inside the run directory; anything that would resolve outside it is refused."""
        target = os.path.realpath(os.path.join(self.path, *parts))
        if os.path.commonpath([target, os.path.realpath(self.path)]) != os.path.realpath(self.path):
            raise RunDirError(f"{os.path.join(*parts)!r} resolves outside the run directory {self.path}")
        return target

    def stage_dir(self, stage: str) -> str:
        return self.inside(stage)

    def acquire(self, console: Callable[[str], None] = print) -> None:
        """One pofa process per run directory: a second one stops here instead of corrupting the first.
        On an object store also: the store must take writes (checked before any cluster work), and
        a lease keeps processes on other machines out."""
        self._lock_local()
        if not self.store.remote:
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

    def _lock_local(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        f = open(os.path.join(self.path, ".lock"), "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirError(f"run directory {self.path} is in use by {holder}; wait for it to finish "
                              "or choose another --run-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
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
        existing = _read(os.path.join(self.path, "recipe.yaml"))
        if existing is None or force:
            return
        previous = (yaml.safe_load(existing) or {}).get("name")
        if previous != recipe.name:
            raise RunDirError(f"run directory {self.path} belongs to recipe {previous!r}, not {recipe.name!r}: "
                              "use a new --run-dir, or --force to redo it with this recipe")

    def write_recipe(self, recipe: Recipe) -> None:
        write_text_atomic(dump_recipe(recipe), os.path.join(self.path, "recipe.yaml"))
