"""The CLI answers at once: `--help`, `validate`, `plan`, `status` and `runs` import none of the heavy
libraries (torch alone took 10 s of `pofa --help` on a loaded machine; `pofa run` loads them when it
starts work)."""
from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ray", "mlflow", "deepspeed", "transformers")


def test_help_and_validate_import_no_heavy_library() -> None:
    code = ("import sys, contextlib, io\n"
            "from orchestrator.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    assert main(['validate', 'bert-base-uncased-sparse-90-unstructured-pruneofa']) == 0\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'pruned_weights: keep' in out.getvalue() and 'usage' in out.getvalue()\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_plan_status_and_runs_import_no_heavy_library(tmp_path) -> None:
    run_dir = tmp_path / "run"
    code = ("import sys, contextlib, io\n"
            "from orchestrator.cli import main\n"
            "for argv in (['plan', 'tiny', '--run-dir', sys.argv[1]], ['status', sys.argv[1]], ['runs']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_lazy_sparsity_package_still_gives_every_name() -> None:
    import pipelines.sparsity as sparsity

    for name in sparsity.__all__:
        assert getattr(sparsity, name) is not None
    try:
        sparsity.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
