"""Driver side of a training run: pre-flight checks, the Ray Train TorchTrainer, the result."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Callable, Iterator

from ray.exceptions import RayActorError
from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from workers import preemption
from workers.console_lines import say
from workers.errors import first_line
from workers.run_records import AttemptRecord, TrainSummary, read_record, read_record_lines
from workers.stall_watchdog import StallError, StallRecord, read_records, stall_folder
from workers.train.elastic import prepare_resume
from workers.train.pretraining_worker import train_loop
from workers.train.preflight import preflight
from workers.train.progress import format_summary
from workers.train.spec import TrainResult


def build_trainer(spec: Any, loop: Callable[[dict], None] = train_loop) -> TorchTrainer:
    """Same `RunConfig(name, storage_path)` on every call: rebuilding it is how Ray Train V2 resumes.
    `spec`: a TrainSpec or a FinetuneSpec (both give `layout`, `run` and `train`). Ray Train's own
    state lives with the run, in the store when the run directory is on one: any node resumes."""
    cfg = spec.train
    use_gpu = cfg.gpus_per_worker > 0
    filesystem, storage_path = spec.layout.store.storage_target(spec.layout.rel(spec.run.ray_storage))
    resources = {"CPU": cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    env = {} if use_gpu else {"DS_ACCELERATOR": "cpu"}
    return TorchTrainer(
        loop,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(name=spec.run.ray_run_name, storage_path=storage_path, storage_filesystem=filesystem,
                             # Ray Train restarts a failed worker group itself (at once, in the same fit); a
                             # fit that still fails is retried by run_training if it moved the run forward
                             # a group that cannot start (no room within the start timeout, a worker lost
                             # while starting) is retried as often, not forever (Ray's default): a cluster
                             # that never has room ends the stage with the error that says so
                             failure_config=FailureConfig(max_failures=cfg.max_failures,
                                                          controller_failure_limit=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
    )


# Ray Train V2 gives a worker group 60 s to start; workers importing torch + DeepSpeed on a busy or
# autoscaling node can take longer. Propagated from the driver to the controller at fit().
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_S = "600"


def fit_with_retries(spec: Any, loop: Callable[[dict], None],
                     sleep: Callable[[float], None] = time.sleep) -> None:
    """Run attempts until one finishes. Ray Train restarts a failed worker group from the newest
    checkpoint up to `max_failures` times in a row; when that is spent but the run moved forward (a
    newer checkpoint than when this fit began), it starts again after a backoff (retry_backoff_s,
    doubling, at most 300 s), so a days-long run survives failures spread over days and stops only
    when `max_failures` failures come without a new checkpoint (-1: never). A node's preemption
    notice ends an attempt cleanly at a checkpoint; the next one resumes on the nodes that remain."""
    cfg = spec.train
    delay, started = cfg.retry_backoff_s, time.time()
    start_deaths = 0  # workers that died while the group started, since the last new checkpoint
    while True:
        newest = _newest_step(spec)
        began, stalls = time.time(), []
        groups_before: set[str] = set()
        try:
            prepare_resume(spec)  # another worker count than the newest checkpoint's: its universal form
            with preemption.graceful_stage(), StallReporter(spec, began) as reporter, _fit_in_flight():
                groups_before = placement_groups()
                try:
                    build_trainer(spec, loop).fit()
                finally:
                    stalls = reporter.finish()
            summary = _read_summary(spec)
            if not summary.preempted:
                return
            if preemption.run_must_stop(started):
                raise preemption.Preempted(spec.run.name, summary.final_step, summary.checkpoint)
            say(f"[{spec.run.name}] a node or worker was preempted at step {summary.final_step}: "
                "resuming from its checkpoint")
            delay = cfg.retry_backoff_s
        except TrainingFailedError as exc:
            step = _newest_step(spec)
            if step > newest:
                start_deaths = 0
            elif (died_while_starting(exc) and (cfg.max_failures < 0 or start_deaths < cfg.max_failures)
                  and release_left_groups(groups_before, spec.run.name)):
                start_deaths += 1
                say(f"[{spec.run.name}] a worker died while the group was starting ({first_line(exc, 200)}); "
                    f"starting again in {delay:g} s (failure {start_deaths} of {_limit(cfg.max_failures)})")
                sleep(delay)
                delay = min(max(delay * 2, 1.0), MAX_BACKOFF_S)
                continue
            if cfg.max_failures == 0 or step <= newest:  # no restarts wanted, or max_failures got nowhere
                if stalls:
                    raise StallError(f"{spec.run.name}: stopped by the stall watchdog and not moved forward by "
                                     f"its retries: " + "; ".join(r.line() for r in stalls)) from exc
                raise
            say(f"[{spec.run.name}] attempts failed ({first_line(exc, 200)}) after reaching step {step}; "
                f"retrying from it in {delay:g} s")
            sleep(delay)
            delay = min(max(delay * 2, 1.0), MAX_BACKOFF_S)


MAX_BACKOFF_S = 300.0


def died_while_starting(exc: BaseException) -> bool:
    """A worker that dies after the group started but before its train function is launched reaches us
    as a ControllerError around the RayActorError, which Ray Train's failure policy does not retry (Ray
    2.60, `WorkerGroup._start_impl`: the `run_train_fn` launch sits outside its RayActorError guard). It is
    a worker failure like any other: pofa retries it against `max_failures`."""
    return isinstance(exc, ControllerError) and isinstance(exc.controller_failure, RayActorError)


_in_flight = 0  # fits running in this process (the fine-tuning stage runs several side by side)
_in_flight_lock = threading.Lock()


@contextlib.contextmanager
def _fit_in_flight() -> Iterator[None]:
    global _in_flight
    with _in_flight_lock:
        _in_flight += 1
    try:
        yield
    finally:
        with _in_flight_lock:
            _in_flight -= 1


def placement_groups() -> set[str]:
    """Ids of the Ray instance's placement groups that are not removed."""
    import ray

    return {pid for pid, t in ray.util.placement_group_table().items() if t["state"] != "REMOVED"}


def release_left_groups(before: set[str], name: str) -> bool:
    """After a worker died while its group started, Ray Train leaves that group's placement group (and
    its surviving workers) in place: the controller never held the group, and its cleaner is stopped
    without removing it, so the next attempt would wait for CPUs that never free. Remove the placement
    groups created since `before` where that is safe: on the local instance pofa started (no other
    driver creates any) with no other fit of this process running. False where it is not safe: the
    attempt then fails as it is, and a rerun of the command resumes on a fresh instance."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray._raylet import PlacementGroupID

    with _in_flight_lock:
        alone = _in_flight == 0
    if not (alone and os.environ.get(PRIVATE_INSTANCE_ENV)):
        return False
    left = placement_groups() - before
    for pid in sorted(left):
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pid))))
    if left:
        say(f"[{name}] removed the placement group(s) the failed start left holding CPUs: {len(left)}")
    return True


# set by the orchestrator in a process whose Ray instance it started locally (orchestrator/ray_leftovers.py)
PRIVATE_INSTANCE_ENV = "POFA_RAY_INSTANCE"


def _limit(max_failures: int) -> str:
    return "unlimited" if max_failures < 0 else str(max_failures)


class StallReporter:
    """While a fit runs, one console line as soon as the stall watchdog stops a worker (Ray Train
    restarts the group inside the fit, which would otherwise say nothing until the stage ends)."""

    def __init__(self, spec: Any, since: float, every_s: float = 5.0) -> None:
        self.spec, self.since, self.every_s = spec, since, every_s
        self.seen: list[StallRecord] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="pofa-stall-reporter", daemon=True)

    def __enter__(self) -> "StallReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> list[StallRecord]:
        """Stop polling, report what is left; every stall of this fit."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._report()
        return list(self.seen)

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self._report()

    def _report(self) -> None:
        for record in read_records(stall_folder(self.spec), self.since):
            if record.stacks not in {r.stacks for r in self.seen}:
                self.seen.append(record)
                say(f"[{self.spec.run.name}] stalled: {record.line()}; that attempt was stopped and is retried")


def _read_summary(spec: Any) -> TrainSummary:
    """The finished attempt's summary (rank 0 may have run on another node: its files come first)."""
    spec.layout.pull(spec.run.root)
    return read_record(TrainSummary, spec.run.summary, spec.run.stage)


def _newest_step(spec: Any) -> int:
    from workers.train.checkpointer import committed_checkpoints

    committed = committed_checkpoints(spec.layout, spec.run)
    return committed[0][0] if committed else 0


def run_training(spec: Any, *, echo: bool = True, loop: Callable[[dict], None] = train_loop,
                 check: Callable[[Any], None] = preflight) -> TrainResult:
    """Run (or resume) one training run to completion and export its model. Needs `ray.init()` first.
    Defaults: a pretraining stage (TrainSpec); fine-tuning passes its own loop and checks."""
    started = time.time()
    check(spec)
    os.environ.setdefault(START_TIMEOUT_ENV, START_TIMEOUT_S)
    run = spec.run
    os.makedirs(run.root, exist_ok=True)
    if os.path.exists(run.summary):
        os.remove(run.summary)  # the summary describes the attempt that finishes now
    fit_with_retries(spec, loop)
    summary = _read_summary(spec)
    start_steps = [a.start_step for a in read_record_lines(AttemptRecord, run.attempts, run.stage)]
    elapsed_s = time.time() - started
    if echo:
        print(format_summary(summary, start_steps, elapsed_s), flush=True)
    return TrainResult(stage=run.name, model_dir=run.model, final_step=summary.final_step,
                       metrics=dict(summary.metrics), checkpoint=summary.checkpoint,
                       start_steps=start_steps, elapsed_s=elapsed_s, summary=summary)
