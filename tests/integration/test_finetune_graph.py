"""The fine-tuning stage as a graph of runs on a real local Ray (2 CPUs, one 1-CPU worker per run): two
seeds train at the same time, one failing run stops nothing else and is the only one a rerun redoes,
and running them one at a time gives the same results and weights."""
from __future__ import annotations

import json

import pytest

from orchestrator.job_graph import run_pipeline
from orchestrator.recipe.load import validate_recipe
from tests.conftest import GENSIM_POLARITY
from tests.workers.test_finetune import models  # noqa: F401 - the fixture: a dense and a 90%-sparse tiny BERT
from tests.workers.train_fixture import read_weights
from workers.run_layout import RunLayout

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

SEEDS = [1, 2, 3]


def _recipe(model: str, **finetune) -> object:
    return validate_recipe({
        "name": "graph", "stages": ["finetune"], "ray": {"num_cpus": 2},
        "finetune": {"model": model, "distill": False, "seeds": SEEDS,
                     "tasks": [{"name": "polarity", "data": {"path": GENSIM_POLARITY}, "max_seq_length": 48,
                                "epochs": 1, "learning_rate": 2e-3, "global_batch_size": 16, "micro_batch_size": 8}],
                     "train": {"num_workers": 1, "checkpoint_every": 5}, **finetune}}, "test")


def _results(run_dir: str) -> dict[int, dict]:
    layout = RunLayout.open(run_dir)
    out = {}
    for seed in SEEDS:
        with open(layout.finetune_run("polarity", f"seed-{seed}").result) as f:
            out[seed] = json.load(f)
    return out


@pytest.fixture(scope="module")
def graph_runs(ray_local, models, tmp_path_factory):  # noqa: F811 - the fixture above
    import workers.finetune.run as finetune_run

    concurrent = str(tmp_path_factory.mktemp("concurrent"))
    real = finetune_run.run_finetune

    def seed_2_breaks(spec, **kw):
        if spec.run_name == "seed-2":
            raise RuntimeError("seed-2 broke on purpose\nsecond line of the trace")
        return real(spec, **kw)

    finetune_run.run_finetune = seed_2_breaks
    try:
        with pytest.raises(RuntimeError) as failure:
            run_pipeline(_recipe(models["student"]), concurrent, console=lambda _: None)
    finally:
        finetune_run.run_finetune = real
    first = {seed: r for seed, r in _results_if_any(concurrent).items()}
    manifests = run_pipeline(_recipe(models["student"]), concurrent, console=lambda _: None)
    sequential = str(tmp_path_factory.mktemp("sequential"))
    run_pipeline(_recipe(models["student"], max_concurrent_runs=1), sequential, console=lambda _: None)
    return {"failure": str(failure.value), "first": first, "concurrent": concurrent, "sequential": sequential,
            "manifest": manifests["finetune"]}


def _results_if_any(run_dir: str) -> dict[int, dict]:
    layout = RunLayout.open(run_dir)
    out = {}
    for seed in SEEDS:
        path = layout.finetune_run("polarity", f"seed-{seed}").result
        try:
            with open(path) as f:
                out[seed] = json.load(f)
        except FileNotFoundError:
            pass
    return out


def test_one_failed_run_stops_nothing_else_and_is_named(graph_runs) -> None:
    assert "polarity/seed-2: RuntimeError: seed-2 broke on purpose" in graph_runs["failure"]
    assert "second line" not in graph_runs["failure"]
    assert sorted(graph_runs["first"]) == [1, 3]  # the other two finished and were kept


def test_the_rerun_redoes_only_the_failed_run(graph_runs) -> None:
    now = _results(graph_runs["concurrent"])
    for seed in (1, 3):
        assert now[seed] == graph_runs["first"][seed]  # untouched: not run again
    assert now[2]["final_step"] == 10 and now[2]["started"] > graph_runs["first"][3]["finished"]


def test_two_runs_trained_at_the_same_time(graph_runs) -> None:
    runs = graph_runs["manifest"].stats["runs"]
    one, three = runs["polarity/seed-1"], runs["polarity/seed-3"]
    assert one["started"] < three["finished"] and three["started"] < one["finished"]  # they overlapped
    assert all(r["nodes"] for r in runs.values())


def test_concurrency_does_not_change_a_result(graph_runs) -> None:
    together, alone = _results(graph_runs["concurrent"]), _results(graph_runs["sequential"])
    for seed in SEEDS:
        assert together[seed]["metrics"] == alone[seed]["metrics"], seed
        ours = read_weights(RunLayout.open(graph_runs["concurrent"]).path(together[seed]["model"]))
        theirs = read_weights(RunLayout.open(graph_runs["sequential"]).path(alone[seed]["model"]))
        assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours), seed
    starts = sorted((r["started"], r["finished"]) for r in alone.values())
    assert all(b[0] >= a[1] for a, b in zip(starts, starts[1:]))  # one at a time there
