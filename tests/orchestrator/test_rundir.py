"""The run directory: one process at a time, nothing outside it, one recipe per directory."""
import os
import subprocess
import sys

import pytest

from orchestrator.recipe.load import load_recipe
from orchestrator.rundir import RunDir, RunDirError, choose_run_dir


def test_second_process_is_refused_while_the_first_holds_the_lock(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    rd.acquire()
    try:
        code = ("from orchestrator.rundir import RunDir, RunDirError\n"
                f"try:\n    RunDir({str(tmp_path / 'run')!r}).acquire()\nexcept RunDirError as e:\n"
                "    print(e); raise SystemExit(3)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 3 and f"in use by pid {os.getpid()}" in res.stdout
    finally:
        rd.release()
    RunDir(str(tmp_path / "run")).acquire()  # free again once released


def test_run_dir_of_another_recipe_is_refused(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    rd.write_recipe(load_recipe("tiny"))
    other = load_recipe("tiny", ["name=other"])
    with pytest.raises(RunDirError, match="belongs to recipe 'tiny', not 'other'"):
        rd.check_recipe(other, force=False)
    rd.check_recipe(other, force=True)


def test_default_run_dir_resumes_the_same_recipe(tmp_path):
    recipe = load_recipe("tiny")
    root = str(tmp_path / "runs")
    first = choose_run_dir(recipe, None, root)
    assert os.path.basename(first).startswith("tiny-")
    RunDir(first).write_recipe(recipe)
    assert choose_run_dir(recipe, None, root) == first  # same command, same run
    changed = load_recipe("tiny", ["seed=1"])
    assert choose_run_dir(changed, None, root) != first
    assert choose_run_dir(recipe, str(tmp_path / "x"), root) == str(tmp_path / "x")


def test_a_run_folder_moved_while_held_is_named_by_the_lock(tmp_path):
    """`mv` of a run folder under a `pofa run`: a second process at the new place is told the holder opened it
    elsewhere, and the holder stops before committing anything to a path that is no longer the run's."""
    rd = RunDir(str(tmp_path / "run"))
    rd.acquire()
    try:
        rd.check_lease()  # in place: nothing to say
        os.rename(tmp_path / "run", tmp_path / "moved")
        code = ("from orchestrator.rundir import RunDir, RunDirError\n"
                f"try:\n    RunDir({str(tmp_path / 'moved')!r}).acquire()\nexcept RunDirError as e:\n"
                "    print(e); raise SystemExit(3)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 3, res.stderr
        assert f"in use by pid {os.getpid()}" in res.stdout and f"opened it at {tmp_path / 'run'}" in res.stdout
        assert "moved while that run holds it" in res.stdout
        with pytest.raises(RunDirError, match="was moved or removed while this run held it"):
            rd.check_lease()
    finally:
        rd.release()
