"""Run tags that say which code and which cluster produced a run."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# MLflow's own tag for the source commit, shown in its UI next to the run.
GIT_COMMIT_TAG = "mlflow.source.git.commit"
PARENT_RUN_TAG = "mlflow.parentRunId"
STAGE_TAG = "pofa.stage"
STAGE_STATUS_TAG = "pofa.stage_status"
RUN_STATUS_TAG = "pofa.status"


def default_tags(ray_address: str | None = None, num_workers: int | None = None) -> dict[str, str]:
    """pofa version, git commit (when pofa runs from a git checkout), Ray address, worker count."""
    tags = {"pofa.version": pofa_version()}
    commit = git_commit()
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        tags["pofa.git_commit"] = commit
    if ray_address:
        tags["pofa.ray_address"] = ray_address
    if num_workers is not None:
        tags["pofa.num_workers"] = str(num_workers)
    return tags


def pofa_version() -> str:
    try:
        return metadata.version("pofa")
    except metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout pofa is imported from, with `-dirty` when it has local changes."""
    source = Path(__file__).resolve().parents[2]
    try:
        head = _git(source, "rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    try:
        dirty = bool(_git(source, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = False
    return f"{head}-dirty" if dirty else head


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
    )
    return done.stdout.strip()
