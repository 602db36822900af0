"""DeepSpeed's native ops (workers/native_ops.py): stale build locks go, live builders are waited on
with a limit, the cache folder is checked before a run, and ops built ahead load without compiling.

The lock tests use real processes (a builder holding torch's lock open, a killed build whose compiler
still runs in the folder) and a stand-in op, so they take seconds; the one test that builds and loads
DeepSpeed's real op is in the integration tier."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workers import native_ops
from workers.native_ops import CACHE_ENV, NativeOpsError

ROOT = Path(__file__).resolve().parents[2]
OP = "deepspeed_shm_comm"


class FakeOp:
    """Stands for a DeepSpeed op builder: what ensure_ops calls once the folder is safe to build in."""

    NAME = "fake_op"

    def __init__(self) -> None:
        self.loads = 0

    def load(self, verbose: bool = False) -> None:
        self.loads += 1


@pytest.fixture
def ops_cache(tmp_path, monkeypatch) -> str:
    """A private cache root; the variables configure() sets come back after the test."""
    for name in ("TORCH_EXTENSIONS_DIR", "CXX", "PATH", "HOME"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "ops"))
    return native_ops.check_cache()


def _op_dir(folder: str) -> str:
    path = os.path.join(folder, FakeOp.NAME)
    os.makedirs(path, exist_ok=True)
    return path


def _started(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == b"ready", "the helper process did not start"


# torch's FileBaton: the builder creates the lock with O_EXCL and keeps it open while it builds
HOLD_TORCH_LOCK = ("import os, sys, time\n"
                   "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)\n"
                   "print('ready', flush=True)\n"
                   "time.sleep(float(sys.argv[2]))\n"
                   "os.close(fd); os.remove(sys.argv[1])\n")
# another pofa process inside build_lock
HOLD_POFA_LOCK = ("import fcntl, os, sys, time\n"
                  "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                  "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d on test' % os.getpid())\n"
                  "print('ready', flush=True)\n"
                  "time.sleep(float(sys.argv[2]))\n")
# a build killed midway: its lock stays, and the compiler it started (ninja's child, running in the
# op's folder) outlives it for a moment
KILLED_BUILD = ("import os, subprocess, sys, time\n"
                "fd = os.open(os.path.join(sys.argv[1], 'lock'), os.O_CREAT | os.O_EXCL)\n"
                "subprocess.Popen(['sleep', '1.5'], cwd=sys.argv[1])\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n")


def test_a_stale_lock_is_cleared_with_one_message_and_the_load_goes_on(ops_cache):
    lock = os.path.join(_op_dir(ops_cache), "lock")
    Path(lock).touch()
    three_hours_ago = time.time() - 3 * 3600
    os.utime(lock, (three_hours_ago, three_hours_ago))
    lines: list[str] = []
    op = FakeOp()
    native_ops.ensure_ops([op], say=lines.append, wait_s=5)
    assert op.loads == 1 and not os.path.exists(lock)
    [stale] = [line for line in lines if "build lock" in line]
    assert stale.startswith(f"removed the stale build lock {lock} (3.0 h old)") and "no builder is alive" in stale


def test_a_killed_build_is_waited_on_while_its_compiler_runs_then_its_lock_is_cleared(ops_cache):
    op_dir = _op_dir(ops_cache)
    build = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, op_dir], stdout=subprocess.PIPE)
    _started(build)
    build.kill()
    build.wait(timeout=30)  # killed just before: ends at once
    lines: list[str] = []
    op = FakeOp()
    native_ops.ensure_ops([op], say=lines.append, wait_s=30)
    assert op.loads == 1 and not os.path.exists(os.path.join(op_dir, "lock"))
    waiting, removed = [line for line in lines if not line.startswith("building")]
    assert "a build is in progress" in waiting and "sleep 1.5" in waiting
    assert removed.startswith("removed the stale build lock")


@pytest.mark.parametrize("script,lock_name", [(HOLD_TORCH_LOCK, "lock"), (HOLD_POFA_LOCK, native_ops.POFA_LOCK)],
                         ids=["torch-lock-held-open", "pofa-build-lock-held"])
def test_a_lock_held_by_a_live_process_is_left_alone_and_waited_on_with_a_limit(ops_cache, script, lock_name):
    lock = os.path.join(_op_dir(ops_cache), lock_name)
    holder = subprocess.Popen([sys.executable, "-c", script, lock, "60"], stdout=subprocess.PIPE)
    try:
        _started(holder)
        op = FakeOp()
        started = time.monotonic()
        with pytest.raises(NativeOpsError) as err:
            native_ops.ensure_ops([op], say=lambda line: None, wait_s=1)
        assert time.monotonic() - started < 10
        assert lock in str(err.value) and f"pid {holder.pid}" in str(err.value)
        assert os.path.exists(lock) and op.loads == 0 and holder.poll() is None
    finally:
        holder.kill()
        holder.wait(timeout=30)  # killed just before: ends at once


def test_a_build_that_ends_within_the_limit_is_waited_for_and_the_load_goes_on(ops_cache):
    lock = os.path.join(_op_dir(ops_cache), "lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TORCH_LOCK, lock, "1"], stdout=subprocess.PIPE)
    try:
        _started(holder)
        lines: list[str] = []
        op = FakeOp()
        native_ops.ensure_ops([op], say=lines.append, wait_s=30)
        assert op.loads == 1 and not os.path.exists(lock)
        assert not [line for line in lines if "stale" in line]  # its builder removed it, not us
    finally:
        holder.kill()
        holder.wait(timeout=30)  # killed just before: ends at once


def test_doctor_removes_a_stale_lock_and_reports_a_live_one_without_waiting(ops_cache):
    stale = os.path.join(ops_cache, "stale_op", "lock")
    live = os.path.join(ops_cache, "live_op", "lock")
    for path in (stale, live):
        os.makedirs(os.path.dirname(path))
    Path(stale).touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_TORCH_LOCK, live, "60"], stdout=subprocess.PIPE)
    try:
        _started(holder)
        lines = native_ops.clear_stale_locks(say=lambda line: None)
        assert [line.split(" (")[0] for line in lines] == [f"{live}: a build is in progress",
                                                         f"removed the stale build lock {stale}"]
        assert os.path.exists(live) and not os.path.exists(stale)
    finally:
        holder.kill()
        holder.wait(timeout=30)  # killed just before: ends at once


def test_an_unusable_cache_folder_is_an_error_naming_the_folder_and_its_setting(ops_cache, tmp_path, monkeypatch,
                                                                               capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(a_file / "ops"))
    with pytest.raises(NativeOpsError, match=rf"{a_file}/ops/py3.*cannot be written.*set by {CACHE_ENV}"):
        native_ops.check_cache()
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("HOME", str(a_file))  # the default root, under a home that is not a folder
    with pytest.raises(NativeOpsError, match=rf"{a_file}/\.cache/pofa/ops.*the default, ~/\.cache/pofa/ops "
                                             rf"\(set {CACHE_ENV} to choose another\)"):
        native_ops.check_cache()

    from orchestrator import cli

    run_dir = tmp_path / "run"
    assert cli.main(["run", "tiny", "--run-dir", str(run_dir)]) == 2  # before the run starts: no Ray, no run dir
    assert f"pofa: error: the DeepSpeed ops cache {a_file}/.cache/pofa/ops" in capsys.readouterr().err
    assert not run_dir.exists()


def test_every_process_gets_one_folder_named_after_its_toolchain(ops_cache, monkeypatch):
    probe = ("import shutil; from workers import native_ops; "
             "print(native_ops.configure()); print(shutil.which('ninja'))")
    out = subprocess.run([sys.executable, "-c", probe], env=os.environ.copy(), cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [ops_cache, native_ops.toolchain().ninja]  # a child started with pofa's settings: the same
    assert shutil.which("ninja") == native_ops.toolchain().ninja  # pofa's own ninja first, whatever PATH had
    monkeypatch.setenv("CXX", "g++")  # another compiler: another folder, never the same folder rebuilt
    assert native_ops.configure() != ops_cache and os.environ["TORCH_EXTENSIONS_DIR"] == native_ops.configure()


def _compile_marks(op_dir: str) -> tuple:
    """What a compile changes in an op's folder: ninja's log and the library."""
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (Path(op_dir) / ".ninja_log",
                                                                       Path(op_dir) / f"{OP}.so"))


LOAD = ("from workers import native_ops\n"
        "[op] = native_ops.ensure_ops()\n"
        "print('compiled' if op.compiled else 'loaded', op.name)\n")


@pytest.mark.integration
def test_after_build_ops_a_fresh_process_loads_the_op_without_compiling(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}  # a CPU training worker's
    empty = subprocess.run([sys.executable, "-m", "orchestrator.cli", "doctor"], cwd=ROOT, capture_output=True,
                           text=True, env={**env, CACHE_ENV: str(tmp_path / "empty")}, timeout=600)
    assert empty.returncode == 1 and f"{OP}: not built" in empty.stdout, empty.stdout + empty.stderr

    # the machine's own folder, where `make install` built it (built here when it did not)
    doctor = subprocess.run([sys.executable, "-m", "orchestrator.cli", "doctor", "--build-ops"], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=1500)
    assert doctor.returncode == 0 and f"{OP}: ready" in doctor.stdout, doctor.stdout + doctor.stderr
    built = os.path.join(native_ops.configure(), OP)
    before = _compile_marks(built)
    fresh = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=600)
    assert fresh.stdout.splitlines()[-1:] == [f"loaded {OP}"], fresh.stdout + fresh.stderr
    assert _compile_marks(built) == before

    # a copy in a private root with a planted stale lock (the machine's folder is shared with other runs)
    private = tmp_path / "private"
    copy = private / os.path.basename(os.path.dirname(built)) / OP
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock", native_ops.POFA_LOCK))
    (copy / "lock").touch()
    resumed = subprocess.run([sys.executable, "-c", LOAD], cwd=ROOT, capture_output=True, text=True,
                             env={**env, CACHE_ENV: str(private)}, timeout=600)
    out = resumed.stdout.splitlines()
    assert out[-1:] == [f"loaded {OP}"], resumed.stdout + resumed.stderr
    assert len([line for line in out if line.startswith(f"removed the stale build lock {copy / 'lock'}")]) == 1
    assert not (copy / "lock").exists() and _compile_marks(str(copy)) == before
