"""A run directory's own MLflow store follows the folder when it is copied or moved.

MLflow keeps absolute artifact locations in the database (each experiment's artifact_location, each
run's artifact_uri, each logged model's and model version's location), and it resolves a relative one
against the current directory, not against the database. So the locations stay absolute, and whenever
pofa opens a run directory's own store it rewrites those under the run's former `mlartifacts/` to where
the folder is now: a copied or moved run folder, or an object-store run fetched to disk, keeps working
in `mlflow ui`, `mlflow.transformers.load_model` and `list_artifacts`.

Plain `sqlite3`: `pofa status` calls this without importing MLflow.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from typing import Optional

from workers.run_layout import RunLayout

logger = logging.getLogger("pofa.tracking")
# (table, column) of every stored artifact location; a table an older MLflow schema lacks is skipped.
LOCATIONS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)
# tracking.json's key of the run directory's own store (TrackingSession.LOCAL_STORE_KEY)
LOCAL_STORE_KEY = "run-directory:mlflow.db"


def artifact_root(layout: RunLayout) -> str:
    """Where the run's artifacts live now: `file:///<run>/mlartifacts`, or the object store's URI."""
    return layout.location_uri(layout.mlflow_artifacts)


def recorded_root(layout: RunLayout, db: sqlite3.Connection) -> Optional[str]:
    """The artifact root the store was written with: its pofa experiment's location (from tracking.json)."""
    try:
        with open(layout.tracking_registry) as f:
            entry = json.load(f).get("stores", {}).get(LOCAL_STORE_KEY)
    except (OSError, ValueError):
        return None
    if not entry:
        return None
    row = db.execute("SELECT artifact_location FROM experiments WHERE experiment_id = ?",
                     (int(entry["experiment_id"]),)).fetchone()
    return row[0] if row and row[0] else None


def relocate_store(layout: RunLayout) -> int:
    """Point the run's `mlflow.db` at its `mlartifacts/` where the folder is now; returns rows rewritten
    (0: it never moved, or there is no store yet). The caller holds the run directory (its lock)."""
    if not os.path.exists(layout.mlflow_db):
        return 0
    new = artifact_root(layout)
    db = sqlite3.connect(layout.mlflow_db, timeout=30)
    try:
        old = recorded_root(layout, db)
        if old is None or old.rstrip("/") == new or not old.rstrip("/").endswith("/mlartifacts"):
            return 0  # in place, or a location pofa did not choose (then it is not ours to move)
        old = old.rstrip("/")
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        rewritten = 0
        with db:  # one transaction: a crash leaves the old locations, and the next open rewrites them
            for table, column in LOCATIONS:
                if table not in tables:
                    continue
                cursor = db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, old, len(old) + 1, old + "/"))
                rewritten += cursor.rowcount
    finally:
        db.close()
    logger.info("pofa: MLflow store of %s moved from %s to %s (%d locations rewritten)", layout.where, old, new,
                rewritten)
    return rewritten


def relocate_if_free(layout: RunLayout) -> int:
    """`relocate_store` for a command that does not hold the run (`pofa status`): done only while no
    `pofa run` holds it (that one relocates on its own open, and must be the only writer)."""
    if layout.store.remote or not os.path.exists(layout.mlflow_db):
        return 0
    try:
        handle = open(layout.lock, "a+")
    except OSError:
        return 0  # a read-only copy: nothing can be rewritten
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        try:
            return relocate_store(layout)
        except sqlite3.Error as exc:  # status still answers; the next `pofa run` tries again
            logger.warning("pofa: could not update the MLflow store of %s to its new place: %s", layout.where, exc)
            return 0
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    finally:
        handle.close()
