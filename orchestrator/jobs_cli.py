"""`pofa submit|status|logs|stop`: the cluster commands, wired into `orchestrator.cli` by

    add_job_commands(sub)                       # in _parser(), after the other sub-commands
    if args.command in JOB_COMMANDS: return run_job_command(args)   # first thing in main()

Exit codes: 0 done, 1 the cluster failed us (unreachable, job failed, unknown job), 2 bad input
(recipe, --set, --address, --run-dir), found before anything is contacted.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

JOB_COMMANDS = ("submit", "status", "logs", "stop")
STOP_WAIT_S = 30.0


def add_job_commands(sub: "argparse._SubParsersAction[Any]") -> None:
    def address_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--address", help="Ray dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 "
                                          "(default: $RAY_ADDRESS); never expose it unauthenticated")

    s = sub.add_parser("submit", help="run the pipeline on an existing Ray cluster (Ray Jobs API)")
    s.add_argument("recipe", help="a YAML file or the name of a built-in recipe (see `pofa recipes`)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (repeatable)")
    s.add_argument("--run-dir", help="absolute path or URI on storage the cluster shares")
    s.add_argument("--stages", help="comma-separated subset of stages to run")
    s.add_argument("--redo", default="", help="comma-separated stages to start over, deleting what they hold")
    s.add_argument("--force", action="store_true", help="redo every selected stage, whatever it holds")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000")
    s.add_argument("--wait", action="store_true", help="follow the logs; exit non-zero unless the job succeeds")
    address_arg(s)
    s.set_defaults(job_command="submit")

    for name, text in (("status", "show a submitted job's status"), ("logs", "print a submitted job's output"),
                       ("stop", "stop a submitted job")):
        if name == "status":
            sp = sub.add_parser(name, help="where a run stands, from its run directory alone (default: the newest "
                                           "under ./runs); or a submitted job's status, given its id")
            sp.add_argument("job", nargs="?", metavar="RUN_DIR|JOB",
                            help="a run directory, or the job id printed by `pofa submit`")
        else:
            sp = sub.add_parser(name, help=text)
            sp.add_argument("job", help="the job id printed by `pofa submit`")
        if name == "logs":
            sp.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        address_arg(sp)
        sp.set_defaults(job_command=name)


def run_job_command(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    try:
        return _dispatch(args)
    except ValueError as exc:  # RecipeError is a ValueError
        jobs.stderr(f"pofa: error: {exc}")
        return 2
    except Exception as exc:  # noqa: BLE001 - narrowed below
        if not _is_cluster_error(exc):
            raise
        jobs.stderr(f"pofa: error: {exc}")
        return 1


def _is_cluster_error(exc: Exception) -> bool:
    """What the Ray SDK raises when the cluster says no: RuntimeError (HTTP errors), RayError (auth),
    requests' errors (OSError), and ours."""
    from ray.exceptions import RayError

    from orchestrator.jobs import JobsError

    return isinstance(exc, (JobsError, RuntimeError, OSError, RayError))


def _dispatch(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    command = getattr(args, "job_command", None) or args.command
    if command == "submit":
        return _submit(args)
    client = jobs.connect_client(args.address)
    if command == "status":
        info = jobs.job_info(client, args.job)
        print(f"{args.job}: {jobs.status_name(info)}")
        for label, value in (("message", info.message), ("entrypoint", info.entrypoint),
                             ("metadata", info.metadata)):
            if value:
                print(f"  {label}: {value}")
        return 0
    if command == "logs":
        jobs.job_info(client, args.job)  # a clear error for an unknown id
        if args.follow:
            jobs.follow_logs(client, args.job, _out)
        else:
            _out(client.get_job_logs(args.job))
        return 0
    if command == "stop":
        jobs.job_info(client, args.job)
        requested = client.stop_job(args.job)
        status = jobs.wait_terminal(client, args.job, STOP_WAIT_S)
        print(f"{args.job}: {status}" + ("" if requested else " (it had already ended)"))
        return 0 if status in jobs.TERMINAL else 1
    raise ValueError(f"unknown job command {command!r}")


def _submit(args: argparse.Namespace) -> int:
    from orchestrator import jobs

    # Everything local first: a bad recipe or address never reaches (or waits for) the cluster.
    sub = jobs.build_submission(args.recipe, args.overrides, args.run_dir, args.stages, args.force, args.env,
                                redo=args.redo)
    url = jobs.resolve_address(args.address)
    for w in sub.warnings:
        jobs.stderr(f"pofa: warning: {w}")
    client = jobs.connect_client(url)
    job_id = jobs.submit(client, sub)
    print(job_id, flush=True)
    if not args.wait:
        jobs.stderr(f"pofa: follow it with `pofa logs {job_id} --follow --address {url}`")
        return 0
    try:
        jobs.follow_logs(client, job_id, _out)
    except KeyboardInterrupt:
        jobs.stderr(f"pofa: stopped following; the job keeps running (`pofa stop {job_id} --address {url}`)")
        return 130
    # The log stream can close a moment before the status is final.
    info_status = jobs.wait_terminal(client, job_id, timeout_s=30.0)
    message = jobs.job_info(client, job_id).message
    jobs.stderr(f"pofa: job {job_id} {info_status}" + (f": {message}" if message else ""))
    return 0 if info_status == "SUCCEEDED" else 1


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Standalone entry (`python -m orchestrator.jobs_cli ...`), the same commands as `pofa`."""
    parser = argparse.ArgumentParser(prog="pofa")
    add_job_commands(parser.add_subparsers(dest="command", required=True))
    return run_job_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
