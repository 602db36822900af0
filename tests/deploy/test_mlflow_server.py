"""deploy/mlflow/start.sh against a real PostgreSQL and a real S3-compatible object store (moto):
runs land in the database, artifacts in the bucket, and requests without valid credentials are
refused."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.deploy.postgres import Postgres, free_port, postgres_tools, running_postgres
from tests.s3_server import BUCKET, S3Server

START = Path(__file__).resolve().parents[2] / "deploy" / "mlflow" / "start.sh"
ADMIN, ADMIN_PASSWORD = "pofa-admin", "admin-test-password-1"

missing = postgres_tools()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(missing is not None, reason=missing or "")]


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "POFA_MLFLOW_"))}
    env.update(PYTHON=sys.executable, **settings)
    return env


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as pg:
        yield pg


# MLflow's server imports, migrates the database and starts its auth app: 20-40 s on 2 quiet cores, over
# 60 s on the same cores under a load of 13 (benchmarks beside the suite)
START_LIMIT_S = 240


@pytest.fixture(scope="module")
def server(postgres: Postgres, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = _env(POFA_MLFLOW_BACKEND_STORE_URI=postgres.uri(), POFA_MLFLOW_ARTIFACTS=s3.uri("mlflow-artifacts"),
               MLFLOW_S3_ENDPOINT_URL=s3.endpoint, **s3.env(s3.read_write), POFA_MLFLOW_PORT=str(port), POFA_MLFLOW_WORKERS="1", POFA_MLFLOW_STATE_DIR=str(tmp / "state"),
               MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               MLFLOW_FLASK_SERVER_SECRET_KEY="test-csrf-key")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(["bash", str(START)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{(tmp / 'server.log').read_text()}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            assert time.monotonic() < deadline, f"no /health in {START_LIMIT_S} s:\n{(tmp / 'server.log').read_text()}"
            time.sleep(0.5)
        yield {"url": url, "s3": s3, "state": tmp / "state", "tmp": tmp, "pid": proc.pid}
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already when it failed to start
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch):
    """Point the MLflow client at the server; the test sets the credentials it wants."""
    def use(url: str, username: str, password: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return use


def test_logs_a_run_with_credentials(server: dict, postgres: Postgres, credentials, tmp_path: Path) -> None:
    import psycopg
    from mlflow import MlflowClient

    credentials(server["url"], ADMIN, ADMIN_PASSWORD)
    client = MlflowClient(server["url"])
    exp = client.create_experiment("pofa-deploy-test")
    run = client.create_run(exp, run_name="tiny")
    rid = run.info.run_id
    client.log_param(rid, "student.pruning.final_sparsity", "0.9")
    for step, loss in enumerate([2.5, 2.0, 1.5]):
        client.log_metric(rid, "train/loss", loss, step=step)
    report = tmp_path / "README.md"
    report.write_text("# tiny run report\n")
    client.log_artifact(rid, str(report), artifact_path="report")
    client.set_terminated(rid)

    got = client.get_run(rid)
    assert got.data.params == {"student.pruning.final_sparsity": "0.9"}
    assert [m.value for m in client.get_metric_history(rid, "train/loss")] == [2.5, 2.0, 1.5]
    assert [f.path for f in client.list_artifacts(rid, "report")] == ["report/README.md"]
    # Proxied artifacts: the client (no object-store credentials) wrote through the server into the bucket.
    import boto3

    s3 = server["s3"]
    bucket = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                          aws_access_key_id=s3.read_only["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3.read_only["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix="mlflow-artifacts/")["Contents"]]
    stored = [k for k in keys if k.endswith(f"/{rid}/artifacts/report/README.md")]
    assert len(stored) == 1
    assert bucket.get_object(Bucket=BUCKET, Key=stored[0])["Body"].read() == b"# tiny run report\n"
    # The run is in PostgreSQL, not in some local file store.
    with psycopg.connect(postgres.uri()) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (rid,))
        assert cur.fetchall() == [("FINISHED",)]
        cur.execute("SELECT username, is_admin FROM users")
        assert cur.fetchall() == [(ADMIN, True)]


def test_records_a_pipeline_run_through_pofas_tracking(server: dict, credentials, tmp_path: Path) -> None:
    """pofa's own tracking layer, credentials from the environment only: parent run + stage run."""
    from mlflow import MlflowClient

    from orchestrator.recipe.load import load_recipe
    from orchestrator.tracking.session import TrackingSession

    credentials(server["url"], ADMIN, ADMIN_PASSWORD)
    recipe = load_recipe("tiny", ["tracking.experiment=pofa-deploy-pipeline"])
    assert recipe.tracking.uri is None  # the server comes from MLFLOW_TRACKING_URI, credentials likewise
    session = TrackingSession.open(recipe.tracking, tmp_path / "run", recipe=recipe.model_dump(mode="json"),
                                   run_name="tiny")
    session.start_stage("student")
    session.log_metrics({"sparsity/global": 0.9}, step=240, key="student")
    session.end_stage("student")
    session.finish()

    client = MlflowClient(server["url"])
    parent = client.get_run(session.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["student.max_steps"] == str(recipe.student.max_steps)
    student = client.get_run(session.stage_run_id("student"))
    assert student.data.metrics == {"sparsity/global": 0.9}
    assert not any(ADMIN_PASSWORD in str(v) for v in {**parent.data.params, **parent.data.tags}.values())


def test_refuses_requests_without_valid_credentials(server: dict, credentials) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    api = f"{server['url']}/api/2.0/mlflow/experiments/search?max_results=5"
    anonymous = requests.get(api, timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers.get("WWW-Authenticate", "").startswith("Basic")
    assert requests.get(api, auth=(ADMIN, "wrong-password"), timeout=10).status_code == 401
    assert requests.get(api, auth=("nobody-here", ADMIN_PASSWORD), timeout=10).status_code == 401
    assert requests.get(api, auth=(ADMIN, ADMIN_PASSWORD), timeout=10).status_code == 200

    credentials(server["url"], ADMIN, "wrong-password")
    started = time.monotonic()
    with pytest.raises(MlflowException) as err:
        MlflowClient(server["url"]).search_experiments()
    assert time.monotonic() - started < 10  # refused at once, not retried for minutes
    assert err.value.error_code == "UNAUTHENTICATED" and "401" in str(err.value), str(err.value)


def test_credentials_stay_out_of_the_rendered_config(server: dict, postgres: Postgres) -> None:
    config = server["state"] / "basic_auth.ini"
    text = config.read_text()
    assert config.stat().st_mode & 0o077 == 0, "the rendered config holds the database password: 0600"
    assert ADMIN_PASSWORD not in text
    assert f"database_uri = {postgres.uri()}" in text and "auth_cache_ttl_seconds = 30" in text
    assert not re.search(r"@[A-Z_]+@", text), "every template field is filled in"
    # the database URI (with its password) never appears on a command line, which any local user can read
    import psutil

    group = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == server["pid"]]
    assert group  # the shell exec-ed into the server; it and its workers are in the group
    for proc in group:
        assert postgres.uri() not in " ".join(proc.cmdline()), proc.cmdline()


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:
        return -1


@pytest.mark.parametrize("settings, error", [
    ({"POFA_MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, "must be a postgresql:// URI"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": ""}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "shorter than 12 characters"),
    ({"POFA_MLFLOW_ARTIFACTS": "relative/dir"}, "expected s3://bucket/prefix or an absolute directory"),
    ({"POFA_MLFLOW_DEFAULT_PERMISSION": "ALL"}, "POFA_MLFLOW_DEFAULT_PERMISSION=ALL"),
    ({"POFA_MLFLOW_AUTH_CACHE_TTL_S": "1m"}, "expected whole seconds"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, "MLFLOW_FLASK_SERVER_SECRET_KEY is not set"),
])
def test_bad_settings_fail_before_starting(settings: dict, error: str, tmp_path: Path) -> None:
    env = _env(POFA_MLFLOW_BACKEND_STORE_URI="postgresql://u:p@127.0.0.1:1/db",
               POFA_MLFLOW_ARTIFACTS=str(tmp_path / "a"), MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
               MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, POFA_MLFLOW_STATE_DIR=str(tmp_path / "s"),
               MLFLOW_FLASK_SERVER_SECRET_KEY="k")
    env.update(settings)
    done = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert error in done.stderr
