"""Sending pofa runs to an existing Ray cluster through the Ray Jobs API (the dashboard port, 8265).

The cluster runs `python -m orchestrator.cli run ...` inside a copy of this code (the runtime_env's
`working_dir`), with the cluster's own Python: its image must already have pofa's dependencies.
Ray is imported lazily so that `pofa recipes` and friends stay fast.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence
from urllib.parse import urlparse

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# What the cluster needs of this repository; everything else at the top level is excluded from the upload.
SHIPPED = ("orchestrator", "workers", "pipelines", "pyproject.toml")
ALWAYS_EXCLUDED = ["__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/"]
PROBE_TIMEOUT_S = 3.0
RECIPE_ENV = "POFA_RECIPE_YAML"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TUNNEL_HINT = ("reach a remote cluster through a tunnel, e.g. `ssh -L 8265:localhost:8265 USER@HEAD` or "
               "`kubectl port-forward svc/HEAD-svc 8265:8265`, then use --address http://127.0.0.1:8265")


class JobsError(RuntimeError):
    """The cluster cannot be reached or refused the request; the message says what to do."""


@dataclass
class Submission:
    """Everything `pofa submit` sends; built (and validated) locally before any network traffic."""

    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def resolve_address(address: Optional[str]) -> str:
    """`--address`, else RAY_ADDRESS, as the http(s) URL of the dashboard (the Jobs API)."""
    raw = (address or os.environ.get("RAY_ADDRESS") or "").strip()
    if not raw:
        raise ValueError("--address: no cluster given; pass --address http://HOST:8265 or set RAY_ADDRESS "
                         "to the Ray dashboard (Jobs API) address")
    url = raw if "://" in raw else f"http://{raw}"
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"--address: {raw!r} is not a Ray Jobs API address; expected the dashboard URL, "
                         "e.g. http://HOST:8265 (not ray:// or the GCS port 6379)")
    return url.rstrip("/")


def check_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """GET /api/version with a short timeout, so a wrong or firewalled address fails in seconds instead of
    hanging inside the Ray client. Returns the cluster's Ray version ('' when the server requires auth)."""
    import requests

    try:
        resp = requests.get(f"{url}/api/version", timeout=timeout)
    except requests.RequestException as exc:
        raise JobsError(f"cannot reach the Ray Jobs API at {url} within {timeout:g} s "
                        f"({type(exc).__name__}); is it the dashboard address (port 8265) of a running cluster? "
                        f"{TUNNEL_HINT}") from None
    if resp.status_code in (401, 403):
        return ""  # reachable; the Ray client adds its auth headers and reports auth errors itself
    try:
        version = resp.json().get("ray_version")
    except ValueError:
        version = None
    if resp.status_code != 200 or not version:
        raise JobsError(f"{url} answered HTTP {resp.status_code} but is not a Ray dashboard "
                        "(GET /api/version has no ray_version); pass the dashboard address, e.g. http://HOST:8265")
    return str(version)


def connect_client(address: Optional[str]) -> "JobSubmissionClient":
    url = resolve_address(address)
    check_reachable(url)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise JobsError(f"the Ray Jobs API at {url} requires a token ({first}): set RAY_AUTH_MODE=token and give "
                        "this machine the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
                        ) from None
    except (ConnectionError, RuntimeError) as exc:
        raise JobsError(f"the Ray Jobs API at {url} refused the connection: {exc}") from None


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_runtime_env(root: Optional[str] = None) -> dict[str, Any]:
    """working_dir = the folder holding the pofa packages, minus everything but SHIPPED (a whitelist written
    as excludes, so .venv, runs/, .git, tests/ never leave this machine)."""
    root = root or repo_root()
    missing = [p for p in ("orchestrator", "workers", "pipelines") if not os.path.isdir(os.path.join(root, p))]
    if missing:
        raise JobsError(f"cannot package pofa's code: {root} lacks {', '.join(missing)}")
    excludes = [f"/{name}" for name in sorted(os.listdir(root)) if name not in SHIPPED]
    return {"working_dir": root, "excludes": excludes + ALWAYS_EXCLUDED}


def build_submission(recipe_arg: str, overrides: Sequence[str] = (), run_dir: Optional[str] = None,
                     stages: Optional[str] = None, force: bool = False, env: Sequence[str] = (),
                     root: Optional[str] = None, redo: str = "") -> Submission:
    """Validate the recipe, stages and run dir locally (RecipeError/ValueError: exit 2, nothing contacted),
    then describe the job."""
    from orchestrator.job_graph import check_redo, select_stages
    from orchestrator.recipe.load import load_recipe

    recipe = load_recipe(recipe_arg, overrides)
    select_stages(recipe, stages.split(",") if stages else None)
    warnings = []
    # On the cluster a relative path lands in the job's working directory: a temporary, shared cache.
    target, key = (run_dir, "--run-dir") if run_dir else (recipe.run_dir, "run_dir")
    if target and "://" not in target and not os.path.isabs(target):
        raise ValueError(f"{key}: {target!r} is relative; on the cluster it would land in the job's temporary "
                         "working directory. Pass an absolute path or URI on storage the cluster shares")
    if target and "://" in target:
        from workers.storage import RunStore, StorageError

        try:
            RunStore.open(target)  # a malformed object-store URI fails here, before anything is sent
        except StorageError as exc:
            raise ValueError(f"{key}: {exc}") from None
    if not target:
        warnings.append("no --run-dir: the job writes under ./runs inside its working directory on the cluster, "
                        "which is temporary; pass --run-dir on shared storage to keep the results")
    if recipe.ray.address:
        warnings.append(f"the recipe sets ray.address={recipe.ray.address!r}: the job's pipeline connects there, "
                        "not to the cluster that runs the job")

    env_vars = {"PYTHONUNBUFFERED": "1"}  # console lines reach `pofa logs` as they happen
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env: {item!r}: expected KEY=VALUE")
        if key in ("PYTHONPATH", "RAY_ADDRESS"):
            # pofa run sets PYTHONPATH itself (Ray refuses a job env that clashes with it); Ray sets RAY_ADDRESS.
            raise ValueError(f"--env: {key} is set by pofa/Ray on the cluster and cannot be overridden")
        env_vars[key] = value

    submission_id = f"pofa-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    prefix = ""
    if os.path.exists(recipe_arg):
        # A local YAML file is not on the cluster: ship its text in the env and write it there first.
        with open(recipe_arg) as f:
            env_vars[RECIPE_ENV] = f.read()
        prefix = (f'f="${{TMPDIR:-/tmp}}/pofa-recipe-{submission_id}.yaml" && '
                  f'printf "%s" "${RECIPE_ENV}" > "$f" && ')
        recipe_token = '"$f"'
    else:
        recipe_token = shlex.quote(recipe_arg)
    args: list[str] = []
    for item in overrides:
        args += ["--set", item]
    if run_dir:
        args += ["--run-dir", run_dir]
    if stages:
        args += ["--stages", stages]
    if redo:
        check_redo(redo.split(","))  # an unknown stage fails here, before anything is sent
        args += ["--redo", redo]
    if force:
        args.append("--force")
    # exec: `pofa stop` signals the pofa process itself, not a shell around it.
    entrypoint = f"{prefix}exec python -m orchestrator.cli run {recipe_token} {shlex.join(args)}".rstrip()
    # (the job's driver, `pofa run`, adds the preemption setup hook when it connects: not here, Ray
    # refuses a job env and a driver env that both set it)
    runtime_env = {**code_runtime_env(root), "env_vars": env_vars}
    metadata = {"pofa_recipe": recipe.name, "pofa_run_dir": run_dir or recipe.run_dir or ""}
    return Submission(entrypoint, runtime_env, submission_id, metadata, warnings)


def submit(client: "JobSubmissionClient", sub: Submission) -> str:
    return client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                             submission_id=sub.submission_id, metadata=sub.metadata)


def job_info(client: "JobSubmissionClient", job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:  # the SDK raises RuntimeError for unknown ids
        raise JobsError(f"job {job_id}: {exc}") from None


def follow_logs(client: "JobSubmissionClient", job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's output until it ends (the Ray stream closes when the job is terminal)."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(_tail())


def wait_terminal(client: "JobSubmissionClient", job_id: str, timeout_s: float, poll_s: float = 0.5) -> str:
    deadline = time.monotonic() + timeout_s
    status = status_name(job_info(client, job_id))
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = status_name(job_info(client, job_id))
    return status


def status_name(info: Any) -> str:
    return str(getattr(info.status, "value", info.status))


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
