"""A graph of runs that go to the cluster side by side whenever it has room.

Each node is one unit of work (a fine-tuning run: a task's teacher, a seed) with the nodes it needs
first and what it asks of the cluster while it runs (CPUs and GPUs: its workers x their resources).
`RunGraph.run` starts every node whose needs are met as soon as the cluster can hold it, up to
`max_concurrent`, each in a thread of this driver (a Ray Train run is a blocking `fit()` that only
waits on the cluster). A node that fails does not stop the others: what depends on it is not
started, everything else finishes, and then the graph fails naming every failed node with the first
line of its error.

A new kind of node joins by being added with its needs and demand: e.g. a fine-tuning probe on an
intermediate student checkpoint needs that checkpoint's node, a task's data preparation needs nothing.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from workers.errors import first_line


@dataclass
class Node:
    name: str
    run: Callable[[], Any]
    needs: tuple[str, ...] = ()
    cpus: float = 0.0
    gpus: float = 0.0
    # filled in by RunGraph.run
    result: Any = None
    error: Optional[BaseException] = None
    started: Optional[float] = None
    finished: Optional[float] = None
    skipped: Optional[str] = None  # why it never started


class GraphFailed(RuntimeError):
    """Some nodes failed; the rest finished (or were not needed)."""

    def __init__(self, failed: list[Node]) -> None:
        self.failed = failed
        lines = []
        for node in failed:
            if node.error is not None:
                lines.append(f"  {node.name}: {first_line(node.error)}")
            else:
                lines.append(f"  {node.name}: not started ({node.skipped})")
        super().__init__(f"{len(failed)} run(s) did not finish:\n" + "\n".join(lines))


@dataclass
class RunGraph:
    capacity: Mapping[str, float]  # what the cluster holds: {"CPU": ..., "GPU": ...}
    max_concurrent: Optional[int] = None  # None: as many as fit
    on_event: Callable[[str, "Node", dict[str, int]], None] = lambda event, node, counts: None
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        if node.name in self.nodes:
            raise ValueError(f"run {node.name!r} is in the graph twice")
        self.nodes[node.name] = node
        return node

    def check(self) -> None:
        """Before anything starts: every need is a node, and every node fits the empty cluster."""
        for node in self.nodes.values():
            unknown = [n for n in node.needs if n not in self.nodes]
            if unknown:
                raise ValueError(f"run {node.name!r} needs {', '.join(unknown)}, which is not in the graph")
            for resource, amount in (("CPU", node.cpus), ("GPU", node.gpus)):
                if amount > self.capacity.get(resource, 0.0):
                    raise ValueError(f"run {node.name!r} needs {amount:g} {resource}s; the cluster has "
                                     f"{self.capacity.get(resource, 0.0):g} even when empty")

    def run(self, poll_s: float = 0.2) -> dict[str, Node]:
        self.check()
        lock = threading.Condition()
        running: dict[str, threading.Thread] = {}
        used = {"CPU": 0.0, "GPU": 0.0}

        def counts() -> dict[str, int]:
            done = sum(1 for n in self.nodes.values() if n.finished is not None or n.skipped)
            return {"running": len(running), "done": done, "total": len(self.nodes)}

        def work(node: Node) -> None:
            try:
                node.result = node.run()
            except BaseException as exc:  # noqa: BLE001 - recorded; the other runs go on
                node.error = exc
            with lock:
                node.finished = time.time()
                running.pop(node.name)
                used["CPU"] -= node.cpus
                used["GPU"] -= node.gpus
                self.on_event("failed" if node.error is not None else "finished", node, counts())
                lock.notify_all()

        with lock:
            while True:
                self._skip_blocked(counts)
                ready = [n for n in self.nodes.values() if n.started is None and not n.skipped
                         and all(self.nodes[d].finished is not None and self.nodes[d].error is None for d in n.needs)]
                for node in ready:
                    if self.max_concurrent is not None and len(running) >= self.max_concurrent:
                        break
                    if (used["CPU"] + node.cpus > self.capacity.get("CPU", 0.0) + 1e-9
                            or used["GPU"] + node.gpus > self.capacity.get("GPU", 0.0) + 1e-9):
                        continue  # waits for room; a smaller ready node may fit now
                    node.started = time.time()
                    used["CPU"] += node.cpus
                    used["GPU"] += node.gpus
                    thread = threading.Thread(target=work, args=(node,), name=f"pofa-run-{node.name}", daemon=True)
                    running[node.name] = thread
                    self.on_event("started", node, counts())
                    thread.start()
                if not running and not any(n.started is None and not n.skipped for n in self.nodes.values()):
                    break
                lock.wait(poll_s)
        failed = [n for n in self.nodes.values() if n.error is not None or n.skipped]
        if failed:
            raise GraphFailed(failed)
        return self.nodes

    def _skip_blocked(self, counts: Callable[[], dict[str, int]]) -> None:
        """A node whose need failed (or was skipped) never starts."""
        changed = True
        while changed:
            changed = False
            for node in self.nodes.values():
                if node.started is not None or node.skipped:
                    continue
                blocked = [d for d in node.needs if self.nodes[d].error is not None or self.nodes[d].skipped]
                if blocked:
                    node.skipped = f"{blocked[0]} did not finish"
                    self.on_event("skipped", node, counts())
                    changed = True
