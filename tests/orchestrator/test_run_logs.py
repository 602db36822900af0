"""`<run>/logs/`: the driver's output, at the file-descriptor level, goes to one file per stage and
attempt; a folder that cannot be written costs the logs and never the run."""
from __future__ import annotations

import os
import subprocess
import sys

from orchestrator.run_logs import RunLogs, next_attempt
from workers.log_files import output_to
from workers.run_layout import RunLayout


def _write_everything(tag: str) -> None:
    """What a Ray or C++ library does (raw fd writes) and what Python code does, through streams on fds
    1 and 2 as in a real `pofa` process (pytest swaps its own into sys.stdout)."""
    os.write(1, f"fd1 {tag}\n".encode())
    os.write(2, f"fd2 {tag}\n".encode())
    with open(1, "w", closefd=False) as out, open(2, "w", closefd=False) as err:
        print(f"print {tag}", file=out, flush=True)
        print(f"stderr {tag}", file=err, flush=True)


def test_driver_output_goes_to_the_stage_attempt_log(tmp_path, capfd) -> None:
    layout = RunLayout.open(str(tmp_path / "run"))
    warnings: list[str] = []
    logs = RunLogs(layout, capture=True, warn=warnings.append)
    logs.start()
    _write_everything("start")
    folder = logs.stage("teacher")
    _write_everything("teacher")
    logs.end_stage()
    again = logs.stage("teacher")  # a second attempt in this run directory gets its own folder
    logs.close()
    _write_everything("after")
    assert folder == os.path.join(layout.logs, "teacher", "attempt-1")
    assert again == os.path.join(layout.logs, "teacher", "attempt-2") and next_attempt(os.path.dirname(again)) == 3
    stage_log = open(os.path.join(folder, "driver.log")).read()
    assert all(f"{kind} teacher" in stage_log for kind in ("fd1", "fd2", "print", "stderr"))
    assert "start" not in stage_log
    run_log = open(os.path.join(layout.logs, "driver.log")).read()
    assert "fd1 start" in run_log and "print start" in run_log and "teacher" not in run_log
    seen = capfd.readouterr()
    assert "fd1 after" in seen.out and "teacher" not in seen.out + seen.err and not warnings


def test_the_failure_traceback_lands_in_the_current_log(tmp_path, capfd) -> None:
    layout = RunLayout.open(str(tmp_path / "run"))
    logs = RunLogs(layout, capture=True, warn=print)
    logs.start()
    logs.stage("student")
    try:
        raise ValueError("the shard is torn")
    except ValueError as exc:
        path = logs.record_failure(exc)
    logs.close()
    text = open(path).read()
    assert path.endswith("student/attempt-1/driver.log") and "Traceback" in text and "the shard is torn" in text


def test_an_unwritable_log_folder_is_one_line_and_the_run_goes_on(tmp_path, capfd) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "logs").write_text("a file where the folder should be")  # fails for root too
    warnings: list[str] = []
    logs = RunLogs(RunLayout.open(str(run)), capture=True, warn=warnings.append)
    logs.start()
    assert logs.stage("teacher") is None  # the workers keep their output with Ray
    _write_everything("still here")
    logs.close()
    assert len(warnings) == 1 and "cannot write" in warnings[0] and "goes on" in warnings[0]
    assert "fd1 still here" in capfd.readouterr().out


def test_not_capturing_leaves_output_where_it_is(tmp_path, capfd) -> None:
    logs = RunLogs(RunLayout.open(str(tmp_path / "run")), capture=False, warn=print)
    logs.start()
    assert logs.stage("teacher") is None
    _write_everything("live")
    logs.close()
    assert "fd1 live" in capfd.readouterr().out and not os.path.exists(tmp_path / "run" / "logs")


def test_a_worker_log_holds_a_child_process_output(tmp_path) -> None:
    """What a worker's redirect catches: output of anything it starts (a DeepSpeed op build, a compiler)."""
    path = str(tmp_path / "logs" / "worker-0.log")
    with output_to(path) as used:
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
    text = open(path).read()
    assert used == path and "child out" in text and "child err" in text
