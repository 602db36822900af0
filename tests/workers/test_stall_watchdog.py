"""The stall watchdog on real hangs in real processes: a thread blocked on a lock, a C call holding the GIL."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from workers.stall_watchdog import STALL_EXIT, read_records

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, body: str, limit_s: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "worker.py"
    script.write_text("import sys, threading, time\n"
                      f"sys.path.insert(0, {str(REPO)!r})\n"
                      "from workers.stall_watchdog import StallWatchdog\n" + body)
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=limit_s,
                          cwd=tmp_path)
    return done, time.monotonic() - started


def test_a_worker_blocked_on_a_lock_is_stopped_with_its_stacks(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    done, took = _run(tmp_path, f"""
def read_next_batch(lock):
    lock.acquire()  # held by nobody who will release it: a real hang

w = StallWatchdog("teacher worker-1", timeout_s=2, folder={str(folder)!r}, exit_grace_s=0.5).start()
for step in range(3):
    w.beat(f"step {{step}}")
    time.sleep(0.3)
lock = threading.Lock()
lock.acquire()
read_next_batch(lock)
print("never")
""")
    assert done.returncode == STALL_EXIT, done.stderr
    assert "never" not in done.stdout
    assert took < 2 + 0.5 + 15  # stopped within the timeout, the grace and the start of Python
    [record] = read_records(str(folder))
    assert record.name == "teacher worker-1" and record.last_progress == "step 2"
    assert record.stalled_s >= 2 and record.pid > 0
    assert "read_next_batch" in record.where[-1] and "lock.acquire()" in record.where[-1]
    stacks = Path(record.stacks).read_text()
    assert "in read_next_batch" in stacks and "pofa-stall-watchdog" in stacks
    assert "made no progress" in done.stderr and "teacher worker-1" in done.stderr
    assert not list(folder.glob("*.backstop.txt")) or all(p.stat().st_size == 0 for p in folder.glob("*.backstop.txt"))


def test_log_lines_and_beats_are_progress_and_stop_disarms(tmp_path: Path) -> None:
    folder, log = tmp_path / "logs", tmp_path / "worker.log"
    done, _ = _run(tmp_path, f"""
w = StallWatchdog("student worker-0", timeout_s=1.0, folder={str(folder)!r}, log_path={str(log)!r},
                  exit_grace_s=0.2).start()
for i in range(12):  # 3 s without a beat, but the log grows
    with open({str(log)!r}, "a") as f:
        f.write(f"line {{i}}\\n")
    time.sleep(0.25)
for i in range(6):  # beats alone
    w.beat(f"step {{i}}")
    time.sleep(0.3)
w.stop()
time.sleep(2.5)  # stopped: no longer watched
print("finished")
""")
    assert done.returncode == 0, done.stderr
    assert "finished" in done.stdout
    assert read_records(str(folder)) == []
    assert not list(folder.glob("*.txt"))  # nothing fired: no stacks, no empty backstop file left


def test_a_hang_that_holds_the_gil_is_caught_by_the_backstop(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    done, took = _run(tmp_path, f"""
import ctypes
w = StallWatchdog("preprocess processor", timeout_s=1, folder={str(folder)!r}, exit_grace_s=0.2,
                  backstop_s=0.5).start()
w.beat("shard 0")
ctypes.PyDLL(None).sleep(30)  # C code that keeps the GIL: the Python watchdog thread cannot run
print("never")
""")
    assert done.returncode != 0 and "never" not in done.stdout
    assert took < 20
    [backstop] = list(folder.glob("*.backstop.txt"))
    assert "most recent call first" in backstop.read_text()


def test_records_are_read_back_by_time_and_torn_ones_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    done, _ = _run(tmp_path, f"""
w = StallWatchdog("teacher worker-0", timeout_s=0.5, folder={str(folder)!r}, exit_grace_s=0).start()
time.sleep(30)
""")
    assert done.returncode == STALL_EXIT
    (folder / "stall-torn-1.json").write_text('{"name": ')
    [record] = read_records(str(folder))
    assert record.last_progress == "starting" and "time.sleep(30)" in record.where[-1]
    assert read_records(str(folder), since=record.time + 1) == []
    assert json.loads(Path(str(record.stacks).replace(".txt", ".json")).read_text())["pid"] == record.pid
    assert read_records(str(tmp_path / "absent")) == []
