"""`pofa status` and `pofa runs` read the run directory alone: done, resumable at step N of M,
failed (error and log), not started; bad input is one clear line."""
from __future__ import annotations

import io
import json
import os
import time

import pytest

from orchestrator.cli import main
from orchestrator.console import Console
from orchestrator.job_graph import run_pipeline
from orchestrator.recipe.load import load_recipe
from orchestrator.rundir import RunDir
from orchestrator.run_status import StatusError, run_state
from orchestrator.stages.report import ReportStage
from tests.orchestrator.test_plan import _checkpoint, _finish, _start


@pytest.fixture
def killed(tmp_path):
    """preprocess finished; the teacher killed after its step-300 checkpoint."""
    recipe = load_recipe("tiny")
    rd = RunDir(str(tmp_path / "run"))
    rd.write_recipe(recipe)
    _finish(rd, recipe, "preprocess")
    _start(rd, recipe, "teacher")
    _checkpoint(rd, "teacher", 100)
    _checkpoint(rd, "teacher", 300)
    return rd


def test_a_killed_run_is_resumable_at_its_newest_checkpoint(killed, capsys) -> None:
    states = {s.stage: s for s in run_state(killed.path).stages}
    assert states["preprocess"].state == "done" and states["preprocess"].detail.startswith("in ")
    assert states["teacher"].state == "resumable"
    assert states["teacher"].detail == "at step 300 of 500 (checkpoint teacher/checkpoints/step-00000300)"
    assert [states[s].state for s in ("student", "finetune", "report")] == ["not started"] * 3
    assert main(["status", killed.path]) == 0
    out = capsys.readouterr().out
    assert "teacher    resumable    at step 300 of 500" in out and "(running:" not in out


def test_a_run_in_progress_is_shown_as_running(killed) -> None:
    killed.acquire(lambda line: None)
    try:
        assert f"pid {os.getpid()}" in run_state(killed.path).running
    finally:
        killed.release()
    assert run_state(killed.path).running is None


def test_a_run_moved_while_in_progress_says_where_its_holder_opened_it(killed, tmp_path) -> None:
    killed.acquire(lambda line: None)
    try:
        os.rename(killed.path, tmp_path / "moved")
        running = run_state(str(tmp_path / "moved")).running
        assert running.startswith(f"pid {os.getpid()}") and f"opened it at {killed.path} (moved since)" in running
    finally:
        killed.release()


def test_a_failed_stage_shows_its_error_and_log(tmp_path, monkeypatch, capsys) -> None:
    """The real job graph and console: the report stage fails; the console names the stage, the error and
    the log that holds the traceback; `pofa status` reads the same from the run directory."""
    def broken(self, ctx):
        raise RuntimeError("disk quota exceeded\nwhile writing the report")

    monkeypatch.setattr(ReportStage, "run", broken)
    recipe = load_recipe("tiny")
    out = io.StringIO()
    run_dir = str(tmp_path / "run")
    with pytest.raises(RuntimeError) as err:
        run_pipeline(recipe, run_dir, ["report"], console=Console(out, tty=False))
    assert getattr(err.value, "pofa_reported", False)
    lines = out.getvalue().splitlines()
    log_dir = os.path.join(run_dir, "logs", "report", "attempt-1")
    assert "[report] failed: RuntimeError: disk quota exceeded" in lines
    assert f"[report] traceback and the workers' logs: {log_dir}" in lines
    assert "Traceback" in open(os.path.join(log_dir, "driver.log")).read()
    state = {s.stage: s for s in run_state(run_dir).stages}["report"]
    assert state.state == "failed" and state.detail.startswith("RuntimeError: disk quota exceeded; log ")
    monkeypatch.undo()
    run_pipeline(recipe, run_dir, ["report"], console=Console(io.StringIO(), tty=False))  # fixed: it reruns
    assert not os.path.exists(os.path.join(run_dir, "report", "failure.json"))
    assert {s.stage: s for s in run_state(run_dir).stages}["report"].state == "done"


def test_runs_lists_every_run_under_the_root(killed, tmp_path, capsys) -> None:
    (tmp_path / "not-a-run").mkdir()
    assert main(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("run ") and "1/5 stages  teacher resumable (at step 300 of 500" in out[0]
    finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(run_state(killed.path).stages[0].finished))
    assert f" {finished}  1/5 stages" in out[0]  # when it last moved
    assert "  teacher: " not in out[0] and "  preprocess: " not in out[0]  # no headline: preprocess only

    _finish(killed, load_recipe("tiny"), "teacher")  # the teacher done: its result is the run's headline
    assert main(["runs", "--root", str(tmp_path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "2/5 stages  student not started  teacher: step 500: val/mlm_acc" in line


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "is not a pofa run directory (it holds no recipe.yaml)"),
    (lambda d: (d / "recipe.yaml").write_text("name: tiny\nstages: [preprocess]\nwarmup: 3\n"),
     "was written by another pofa version: its recipe.yaml does not validate here (warmup"),
])
def test_bad_folders_are_one_line(tmp_path, capsys, make, message) -> None:
    folder = tmp_path / "x"
    folder.mkdir()
    make(folder)
    assert main(["status", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_manifest_from_an_older_version_is_one_line(killed, capsys) -> None:
    path = killed.layout.manifest("preprocess")
    manifest = json.load(open(path))
    manifest["format"] = 1
    json.dump(manifest, open(path, "w"))
    with pytest.raises(StatusError, match="written by another pofa version"):
        run_state(killed.path)
    assert main(["status", killed.path]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_failure_record_missing_a_field_is_one_line(killed, capsys) -> None:
    path = killed.layout.failure("teacher")
    json.dump({"type": "RuntimeError", "log": None, "time": 0.0}, open(path, "w"))  # no "error"
    with pytest.raises(StatusError, match=f"{path}: field error is missing; redo the teacher stage"):
        run_state(killed.path)
    assert main(["status", killed.path]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_job_id_still_reaches_the_jobs_api(capsys, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["status", "raysubmit_abc123"]) == 2  # the job command: no --address given
    assert "--address" in capsys.readouterr().err


def test_the_closing_table_ends_with_the_total_of_the_stages_times(killed) -> None:
    from orchestrator.run_summary import summary_lines
    from workers.stage_outputs import load_manifest

    _finish(killed, load_recipe("tiny"), "teacher")
    manifests = {s: load_manifest(killed.layout, s) for s in ("preprocess", "teacher")}
    lines = summary_lines(manifests, killed.layout)
    assert lines[1].split() == ["stage", "time", "result", "outputs"]
    assert [line.split()[0] for line in lines[2:]] == ["preprocess", "teacher", "total"]
    total = sum(m.wall_time_s for m in manifests.values())
    assert lines[-1].split() == ["total", f"{int(total)}s"] and lines[-1] == lines[-1].rstrip()
