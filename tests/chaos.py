"""Faults at random moments into a real `pofa run`, rerun until done, compared with an uninterrupted run.

Shared by the CI test (tests/integration/test_chaos.py: a few faults) and the soak
(`make bench-chaos`, tests/bench/bench_chaos.py: more faults, a longer recipe). A seed fixes the
schedule: which kind of fault, in which stage, at which kind of moment. The moments are events the
harness watches for in the run directory, so every kind is reached whatever the machine's speed:

- `start-up`: the stage's workers have started (a worker log exists) and have logged no step of this
  attempt yet: model build, DeepSpeed's op loading and engine start, checkpoint load;
- `step`: the stage's metrics reached a chosen step;
- `checkpoint`: a checkpoint is being written (a staging folder, or a step folder without its
  MANIFEST.json);

and the kinds: `sigterm-run` (SIGTERM to `pofa run`'s process group, as a shell's kill or a container
stop), `sigkill-run` (SIGKILL to the group: nothing runs any clean-up), `sigkill-worker` (SIGKILL to
one Ray Train worker process of the run's Ray instance: Ray Train restarts the group, the same
`pofa run` goes on). After a run-level fault the same command is run again.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sigkill-worker", "sigterm-run", "sigkill-run")
MOMENTS = ("start-up", "step", "checkpoint")
TRAINING = ("teacher", "student")


@dataclass(frozen=True)
class Size:
    """The recipe `tiny`, shortened: `--set` overrides and the stages run."""

    teacher_steps: int = 6
    student_steps: int = 8
    documents: int = 30

    def sets(self) -> list[str]:
        t, s = self.teacher_steps, self.student_steps
        end = max(2, s * 3 // 4)
        return [f"preprocess.source.max_documents={self.documents}", "ray.num_cpus=2",
                f"teacher.max_steps={t}", f"teacher.eval_every={t}", "teacher.checkpoint_every=2",
                f"student.max_steps={s}", f"student.eval_every={s}", "student.checkpoint_every=2",
                f"student.pruning.schedule.policy_end_step={max(2, end - 2)}",
                f"student.pruning.schedule.end_pruning_step={end}",
                "student.pruning.schedule.pruning_frequency=2",
                "teacher.retry_backoff_s=1", "student.retry_backoff_s=1"]


STAGES = "preprocess,teacher,student"


@dataclass(frozen=True)
class Fault:
    kind: str
    stage: str
    moment: str
    step: int  # for `step`: the metrics step that triggers it

    def describe(self) -> str:
        at = f"step {self.step}" if self.moment == "step" else self.moment
        return f"{self.kind} in {self.stage} at {at}"


def schedule(seed: int, count: int, size: Size) -> list[Fault]:
    """`count` faults from `seed`: every kind and every kind of moment comes up before any repeats."""
    rng = random.Random(seed)
    kinds, moments = list(KINDS), list(MOMENTS)
    rng.shuffle(kinds)
    rng.shuffle(moments)
    faults = []
    for i in range(count):
        stage = rng.choice(TRAINING)
        steps = size.teacher_steps if stage == "teacher" else size.student_steps
        faults.append(Fault(kinds[i % len(kinds)], stage, moments[(i + i // len(kinds)) % len(moments)],
                            rng.randint(1, steps - 1)))
    return sorted(faults, key=lambda f: TRAINING.index(f.stage))  # in pipeline order, so that each can come


@dataclass
class Outcome:
    fault: Fault
    fired: bool  # False: the stage ended before the moment came (the fault is dropped)
    waited_s: float  # from the attempt's start to the fault
    recovery_s: float = 0.0  # from the fault to the stage's next logged step (or the run's end)
    rc: Optional[int] = None  # the `pofa run` exit code after a run-level fault


@dataclass
class ChaosRun:
    run_dir: Path
    outcomes: list[Outcome] = field(default_factory=list)
    attempts: int = 0
    tokens: set[str] = field(default_factory=set)  # every Ray instance the attempts started
    elapsed_s: float = 0.0


def pofa_command(run_dir: Path, size: Size) -> list[str]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--run-dir", str(run_dir), "--stages", STAGES]
    for s in size.sets():
        cmd += ["--set", s]
    return cmd


def run_clean(run_dir: Path, size: Size, limit_s: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(pofa_command(run_dir, size), capture_output=True, text=True, timeout=limit_s, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"pofa run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def run_with_faults(run_dir: Path, size: Size, faults: list[Fault], limit_s: float = 1800) -> ChaosRun:
    """Start `pofa run`, inject each fault when its moment comes (whichever pending one comes first), rerun
    after a run-level fault, and finish with a run that completes. Raises if it never completes within
    `limit_s`, or when a run fails outside any fault."""
    chaos = ChaosRun(run_dir)
    started = time.monotonic()
    pending = list(faults)
    while True:
        if time.monotonic() - started > limit_s:
            raise TimeoutError(f"chaos run not finished after {limit_s:g} s: {chaos.outcomes}")
        chaos.attempts += 1
        # the console to a file, never a pipe nobody reads while faults are awaited (a full pipe blocks pofa)
        console = run_dir.parent / f"{run_dir.name}-console-{chaos.attempts}.txt"
        with open(console, "w") as sink:
            proc = subprocess.Popen(pofa_command(run_dir, size), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        attempt_began = time.monotonic()
        ended_by_fault = False
        try:
            while pending and proc.poll() is None:
                fault = _wait_for_a_moment(run_dir, pending, proc, chaos, attempt_began,
                                           deadline=started + limit_s)
                if fault is None:
                    break  # the run ended
                pending.remove(fault)
                outcome = Outcome(fault, True, time.monotonic() - attempt_began)
                chaos.outcomes.append(outcome)
                if fault.kind == "sigkill-worker":
                    _kill_a_worker(run_dir)
                    outcome.recovery_s = _time_to_next_step(run_dir, fault.stage, proc)
                    continue
                os.killpg(proc.pid, signal.SIGTERM if fault.kind == "sigterm-run" else signal.SIGKILL)
                outcome.rc = proc.wait(timeout=180)
                ended_by_fault = True
                break
            proc.wait(timeout=max(60.0, limit_s - (time.monotonic() - started)))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        if ended_by_fault:
            continue
        if proc.returncode == 0:
            # faults whose moment never came in this attempt (the stage ended first) are dropped
            chaos.outcomes += [Outcome(f, False, 0.0) for f in pending]
            chaos.elapsed_s = time.monotonic() - started
            return chaos
        raise RuntimeError(f"pofa run failed with {proc.returncode} outside any fault:\n{console.read_text()[-4000:]}")


def _token(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / ".ray-instance.json").read_text())["token"]
    except (OSError, ValueError, KeyError):
        return None


def _wait_for_a_moment(run_dir: Path, pending: list[Fault], proc: subprocess.Popen, chaos: ChaosRun,
                       began: float, deadline: float) -> Optional[Fault]:
    """Poll (every 10 ms: a tiny model's checkpoint is written in a fraction of a second) until the moment
    of any pending fault comes, and return that fault; None when the attempt ends first. A fault whose stage
    has finished is dropped (recorded as not fired): its moment will not come."""
    seen = {f.stage: _steps(run_dir / f.stage) for f in pending}
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"chaos run: no fault's moment came and the run did not end by the limit; pending: "
                               f"{[f.describe() for f in pending]}")
        token = _token(run_dir)
        if token:
            chaos.tokens.add(token)
        for fault in list(pending):
            stage_dir = run_dir / fault.stage
            if _stage_finished(run_dir, fault.stage):
                pending.remove(fault)
                chaos.outcomes.append(Outcome(fault, False, time.monotonic() - began))
                continue
            steps = _steps(stage_dir)
            if fault.moment == "step" and steps >= fault.step and steps > seen[fault.stage]:
                return fault
            if fault.moment == "checkpoint" and _writing_checkpoint(stage_dir):
                return fault
            if fault.moment == "start-up" and steps == seen[fault.stage] and _workers_started(run_dir, fault.stage,
                                                                                               began):
                return fault
        time.sleep(0.01)
    return None


def _stage_finished(run_dir: Path, stage: str) -> bool:
    return (run_dir / stage / "manifest.json").exists()


def _steps(stage_dir: Path) -> int:
    metrics = stage_dir / "metrics.jsonl"
    if not metrics.exists():
        return 0
    steps = 0
    for line in metrics.read_text().splitlines():
        try:
            steps = max(steps, int(json.loads(line).get("step", 0)))
        except ValueError:
            continue  # a torn last line
    return steps


def _writing_checkpoint(stage_dir: Path) -> bool:
    folder = stage_dir / "checkpoints"
    if not folder.is_dir():
        return False
    for name in os.listdir(folder):
        if name.startswith(".tmp-step-") or (name.startswith("step-") and not (folder / name / "MANIFEST.json").exists()):
            return True
    return False


def _workers_started(run_dir: Path, stage: str, since: float) -> bool:
    folder = run_dir / "logs" / stage
    if not folder.is_dir():
        return False
    now = time.monotonic()
    for log in folder.glob("attempt-*/worker-*.log"):
        if time.time() - log.stat().st_mtime < now - since + 1:  # written during this attempt
            return True
    return False


def _kill_a_worker(run_dir: Path) -> None:
    from orchestrator.ray_leftovers import instance_processes

    token = _token(run_dir)
    workers = [p for p in instance_processes(token)] if token else []
    workers = [p for p in workers if "RayTrainWorker" in " ".join(p.cmdline())]
    if not workers:
        raise RuntimeError("sigkill-worker: no Ray Train worker of this run is alive")
    workers[0].kill()


def _time_to_next_step(run_dir: Path, stage: str, proc: subprocess.Popen, limit_s: float = 600) -> float:
    began, steps = time.monotonic(), _steps(run_dir / stage)
    while proc.poll() is None and time.monotonic() - began < limit_s:
        if _steps(run_dir / stage) > steps or _stage_finished(run_dir, stage):
            break
        time.sleep(0.2)
    return time.monotonic() - began


# -- comparing with the uninterrupted run ------------------------------------------------------------

def last_losses(run_dir: Path, stage: str) -> dict[int, float]:
    """step -> the training loss of the attempt that went on from it (the last record of each step)."""
    out: dict[int, float] = {}
    for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[int(record["step"])] = float(record["loss"])
    return out


def differences(reference: Path, chaos: Path) -> list[str]:
    """What differs between two finished runs: exported weights (bit for bit, so masks too) and the
    per-step losses of each training stage. [] when identical."""
    from safetensors.torch import load_file

    problems = []
    for stage in TRAINING:
        a, b = load_file(str(reference / stage / "model" / "model.safetensors")), \
            load_file(str(chaos / stage / "model" / "model.safetensors"))
        if a.keys() != b.keys():
            problems.append(f"{stage}: other tensors")
        problems += [f"{stage}: {name} differs" for name in a if name in b and not a[name].equal(b[name])]
        la, lb = last_losses(reference, stage), last_losses(chaos, stage)
        if la != lb:
            problems.append(f"{stage}: per-step losses differ at steps "
                            f"{sorted(s for s in la.keys() | lb.keys() if la.get(s) != lb.get(s))}")
    return problems


def committed_checkpoints(run_dir: Path, stage: str) -> list[str]:
    folder = run_dir / stage / "checkpoints"
    return sorted(n for n in os.listdir(folder) if n.startswith("step-") and (folder / n / "MANIFEST.json").exists())
