"""`pofa submit|status|logs|stop` against a real Ray cluster started here with `ray start --head`.

The cluster uses token authentication with a token made for this test, so it is independent of
~/.ray/auth_token; the CLI runs in subprocesses that carry the token (as a user's shell would), which
keeps Ray's process-wide token cache out of this pytest process.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests

from orchestrator import jobs
from orchestrator.cli import main as pofa_main

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, address: str, token: str, env: dict[str, str], temp_dir: str):
        self.address, self.token, self.env, self.temp_dir = address, token, env, temp_dir

    def cli(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        """`pofa ARGS --address ...` as a user runs it."""
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--address", self.address],
                              cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, "--address", self.address],
                                cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def job(self, job_id: str) -> dict:
        r = requests.get(f"{self.address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {self.token}"},
                         timeout=10)
        r.raise_for_status()
        return r.json()

    def logs(self, job_id: str) -> str:
        r = requests.get(f"{self.address}/api/jobs/{job_id}/logs",
                         headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        r.raise_for_status()
        return r.json()["logs"]


def _stop_process_tree(leader_pgid: int) -> None:
    """Stop only what our `ray start` launched: its process group (GCS, raylet, dashboard, ...) and every
    descendant (Ray workers get process groups of their own). Never `ray stop`: it kills every Ray on the
    machine, including other test sessions'."""
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == leader_pgid:
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
        except (psutil.Error, ProcessLookupError):
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    temp_dir = tempfile.mkdtemp(prefix="pofaj", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the jobs' `python` is this environment's
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    dash = _free_port()
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={_free_port()}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", "--disable-usage-stats"]
    starter = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = starter.communicate(timeout=150)
        assert starter.returncode == 0, f"ray start failed:\n{out}"
        yield Cluster(f"http://127.0.0.1:{dash}", token, env, temp_dir)
    finally:
        _stop_process_tree(starter.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def test_submit_wait_status_logs_and_stop(cluster: Cluster, tmp_path: Path) -> None:
    # A short job, followed to the end in the background: logs stream to stdout, the exit code is the job's fate.
    run_dir = tmp_path / "short"
    waiting = cluster.popen("submit", "tiny", "--stages", "preprocess", "--set", "preprocess.source.max_documents=10",
                            "--set", "preprocess.num_workers=1", "--set", "preprocess.tokenizer.train_documents=10",
                            "--run-dir", str(run_dir), "--wait")

    # And one that fails (its run directory is a file): --wait exits non-zero.
    not_a_dir = tmp_path / "not-a-dir"
    not_a_dir.write_text("")
    failing = cluster.popen("submit", "tiny", "--stages", "preprocess", "--run-dir", str(not_a_dir), "--wait")

    # Meanwhile a long job (the whole corpus) is stopped while it runs.
    long_run = tmp_path / "long"
    sub = cluster.cli("submit", "tiny", "--stages", "preprocess", "--run-dir", str(long_run))
    assert sub.returncode == 0, sub.stderr
    long_id = sub.stdout.strip()
    t0 = time.monotonic()
    assert long_id.startswith("pofa-tiny-")
    # Stopped as soon as its entrypoint runs: less CPU taken from the short job on a 2-core machine.
    _wait_for(lambda: cluster.job(long_id)["status"] == "RUNNING", 120, "the long job to run")
    print(f"long job running after {time.monotonic() - t0:.0f}s")
    stop = cluster.cli("stop", long_id)
    assert stop.returncode == 0, stop.stderr
    assert f"{long_id}: STOPPED" in stop.stdout
    assert cluster.job(long_id)["status"] == "STOPPED"
    assert not (long_run / "preprocess" / "manifest.json").exists()

    out, err = waiting.communicate(timeout=240)
    assert waiting.returncode == 0, out[-3000:] + err[-3000:]
    job_id = out.splitlines()[0].strip()
    assert "[preprocess]" in out
    assert f"job {job_id} SUCCEEDED" in err
    manifest = json.loads((run_dir / "preprocess" / "manifest.json").read_text())
    assert manifest["stats"]["documents_train"] + manifest["stats"]["documents_validation"] == 10

    out, err = failing.communicate(timeout=120)
    assert failing.returncode == 1, out[-3000:] + err[-3000:]
    assert f"job {out.splitlines()[0].strip()} FAILED" in err

    for jid in (long_id, job_id):  # where the time went, for `pytest -s`
        j = cluster.job(jid)
        print(f"{jid}: {j['status']} in {(j['end_time'] - j['start_time']) / 1000:.0f}s")

    status, logs = cluster.popen("status", job_id), cluster.popen("logs", job_id)
    out, err = status.communicate(timeout=120)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in out, err
    out, err = logs.communicate(timeout=120)
    assert logs.returncode == 0 and "[preprocess]" in out and "Running entrypoint" in out, err

    # Only pofa's code travelled: the job's working directory holds the whitelisted top-level entries.
    working_dir = cluster.job(job_id)["runtime_env"]["working_dir"]
    unpacked = list(Path(cluster.temp_dir).glob(
        f"session_*/runtime_resources/working_dir_files/{Path(working_dir).stem}"))
    assert unpacked, working_dir
    assert sorted(p.name for p in unpacked[0].iterdir()) == sorted(jobs.SHIPPED)


def test_unknown_job_and_missing_token_are_clear_errors(cluster: Cluster, capsys) -> None:
    missing = cluster.cli("status", "pofa-no-such-job")
    assert missing.returncode == 1 and "pofa-no-such-job" in missing.stderr and "does not exist" in missing.stderr
    # This pytest process has no token for the cluster: refused with a hint, not a traceback.
    assert pofa_main(["status", "pofa-no-such-job", "--address", cluster.address]) == 1
    err = capsys.readouterr().err
    assert "requires a token" in err and "RAY_AUTH_MODE=token" in err


# --- bad input: found locally, or within seconds ---

def test_unresponsive_or_closed_address_fails_within_seconds(capsys) -> None:
    with socket.socket() as silent:  # accepts TCP connections (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        assert pofa_main(["status", "some-job", "--address", url]) == 1
        assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert f"cannot reach the Ray Jobs API at {url}" in err and "ssh -L 8265" in err

    closed = f"127.0.0.1:{_free_port()}"  # no scheme: taken as http://
    start = time.monotonic()
    assert pofa_main(["stop", "some-job", "--address", closed]) == 1
    assert time.monotonic() - start < 5
    assert f"http://{closed}" in capsys.readouterr().err


def test_bad_input_exits_2_before_contacting_the_cluster(monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as silent:  # would hang a probe for 3 s; bad input must not get that far
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert pofa_main(["submit", "tiny", "--set", "preprocess.max_seq_length=oops", "--address", url]) == 2
        assert "preprocess.max_seq_length" in capsys.readouterr().err
        assert pofa_main(["submit", "tiny", "--stages", "nope", "--address", url]) == 2
        assert "--stages" in capsys.readouterr().err
        assert pofa_main(["submit", "tiny", "--run-dir", "runs/x", "--address", url]) == 2
        assert "--run-dir" in capsys.readouterr().err
        assert pofa_main(["submit", "tiny", "--run-dir", "s3://bucket/runs/../../x", "--address", url]) == 2
        assert "--run-dir" in capsys.readouterr().err
        assert pofa_main(["submit", "tiny", "--env", "PYTHONPATH=/x", "--address", url]) == 2
        assert "PYTHONPATH" in capsys.readouterr().err
        assert pofa_main(["submit", "tiny", "--address", "ray://head:10001"]) == 2
        assert "http://HOST:8265" in capsys.readouterr().err
    assert pofa_main(["status", "some-job"]) == 2
    assert "RAY_ADDRESS" in capsys.readouterr().err


def test_runtime_env_ships_only_pofa_code() -> None:
    env = jobs.code_runtime_env()
    assert env["working_dir"] == str(REPO)
    shipped = [e for e in os.listdir(REPO) if f"/{e}" not in env["excludes"]]
    assert sorted(shipped) == sorted(e for e in jobs.SHIPPED if (REPO / e).exists())
    assert "/.venv" in env["excludes"] and "/tests" in env["excludes"] and "__pycache__/" in env["excludes"]


def test_local_recipe_file_travels_in_the_entrypoint(tmp_path: Path) -> None:
    """A YAML path on this machine does not exist on the cluster: its text goes in the job's env and the
    entrypoint writes it out before running. Checked by running the entrypoint with a stand-in `python`."""
    recipe = tmp_path / "my recipe.yaml"
    recipe.write_text((REPO / "orchestrator/builtin_recipes/tiny.yaml").read_text() + "# it's $HOME \"quoted\"\n")
    sub = jobs.build_submission(str(recipe), ["preprocess.num_workers=1"], "/shared/runs/a b", "preprocess")
    assert sub.runtime_env["env_vars"][jobs.RECIPE_ENV] == recipe.read_text()
    assert sub.metadata == {"pofa_recipe": "tiny", "pofa_run_dir": "/shared/runs/a b"}
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text('#!/bin/sh\nprintf "%s|" "$@"; echo; cat "$4"\n')
    (fake_bin / "python").chmod(0o755)
    env = {**os.environ, **sub.runtime_env["env_vars"], "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path)}
    out = subprocess.run(["sh", "-c", sub.entrypoint], env=env, capture_output=True, text=True, check=True).stdout
    args, _, written = out.partition("\n")
    assert args.split("|")[:4] == ["-m", "orchestrator.cli", "run", str(tmp_path / f"pofa-recipe-{sub.submission_id}.yaml")]
    assert args.split("|")[4:-1] == ["--set", "preprocess.num_workers=1", "--run-dir", "/shared/runs/a b",
                                     "--stages", "preprocess"]
    assert written == recipe.read_text()
