"""The graph of runs, without a cluster: runs whose needs are met start together while the cluster
has room, a failure stops only what depends on it, and what can never fit fails before anything."""
from __future__ import annotations

import threading
import time

import pytest

from orchestrator.run_graph import GraphFailed, Node, RunGraph


def _sleeper(log: list, name: str, seconds: float = 0.3, fail: bool = False):
    def run() -> str:
        log.append(("start", name, time.monotonic()))
        time.sleep(seconds)
        log.append(("end", name, time.monotonic()))
        if fail:
            raise RuntimeError(f"{name} broke\nsecond line")
        return name
    return run


def test_independent_runs_overlap_up_to_what_the_cluster_holds() -> None:
    log: list = []
    graph = RunGraph({"CPU": 2.0})
    graph.add(Node("t/teacher", _sleeper(log, "t/teacher"), cpus=1))
    for seed in (1, 2, 3):
        graph.add(Node(f"t/seed-{seed}", _sleeper(log, f"t/seed-{seed}"), needs=("t/teacher",), cpus=1))
    nodes = graph.run(poll_s=0.02)
    assert {n.result for n in nodes.values()} == {"t/teacher", "t/seed-1", "t/seed-2", "t/seed-3"}
    teacher_end = next(t for e, n, t in log if e == "end" and n == "t/teacher")
    assert all(t >= teacher_end for e, n, t in log if e == "start" and n != "t/teacher")  # after their need
    running, peak = 0, 0
    for event, _, _ in sorted(log, key=lambda x: (x[2], x[0] == "start")):
        running += 1 if event == "start" else -1
        peak = max(peak, running)
    assert peak == 2  # two 1-CPU runs side by side on 2 CPUs, never three


def test_max_concurrent_runs_is_honoured() -> None:
    log: list = []
    graph = RunGraph({"CPU": 8.0}, max_concurrent=1)
    for i in range(3):
        graph.add(Node(f"r{i}", _sleeper(log, f"r{i}", 0.05), cpus=1))
    graph.run(poll_s=0.01)
    starts = [t for e, _, t in log if e == "start"]
    ends = [t for e, _, t in log if e == "end"]
    assert all(s >= e for s, e in zip(starts[1:], ends[:-1]))


def test_a_failure_stops_only_what_depends_on_it() -> None:
    log: list = []
    events: list = []
    graph = RunGraph({"CPU": 4.0}, on_event=lambda e, n, c: events.append((e, n.name)))
    graph.add(Node("a/teacher", _sleeper(log, "a/teacher", 0.05, fail=True), cpus=1))
    graph.add(Node("a/seed-1", _sleeper(log, "a/seed-1"), needs=("a/teacher",), cpus=1))
    graph.add(Node("b/seed-1", _sleeper(log, "b/seed-1", 0.1), cpus=1))
    with pytest.raises(GraphFailed) as err:
        graph.run(poll_s=0.01)
    text = str(err.value)
    assert "a/teacher: RuntimeError: a/teacher broke" in text and "second line" not in text
    assert "a/seed-1: not started (a/teacher did not finish)" in text
    assert graph.nodes["b/seed-1"].result == "b/seed-1"  # the independent run finished
    assert ("skipped", "a/seed-1") in events and ("finished", "b/seed-1") in events


def test_what_can_never_fit_or_needs_what_is_missing_fails_before_anything_starts() -> None:
    started = threading.Event()
    graph = RunGraph({"CPU": 2.0, "GPU": 0.0})
    graph.add(Node("big", started.set, cpus=4))
    with pytest.raises(ValueError, match="'big' needs 4 CPUs; the cluster has 2 even when empty"):
        graph.run()
    assert not started.is_set()
    graph = RunGraph({"CPU": 2.0})
    graph.add(Node("orphan", started.set, needs=("nobody",)))
    with pytest.raises(ValueError, match="needs nobody, which is not in the graph"):
        graph.run()
    with pytest.raises(ValueError, match="twice"):
        graph.add(Node("orphan", started.set))
