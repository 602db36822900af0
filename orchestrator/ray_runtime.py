"""Connecting to Ray: an existing cluster when an address is given, else a local instance."""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Optional

import ray

from orchestrator.ray_leftovers import mark_instance, stop_instance
from orchestrator.recipe.schema import RayConfig
from workers.preemption import SETUP_HOOK, block_sigterm_for_children

log = logging.getLogger("pofa")


def connect(cfg: RayConfig, log_to_driver: bool = True, instance_record: Optional[str] = None) -> str:
    """Connect (or start locally) and return the address. The local dashboard and its Jobs API listen on
    127.0.0.1 only unless the recipe opts in: they run arbitrary code for anyone who can reach them.
    `log_to_driver=False`: the workers' output stays in their log files (`<run>/logs/`) and Ray's.
    `instance_record`: where a local instance is recorded, so that a later run stops what a SIGKILL left."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        # `pofa submit` reads RAY_ADDRESS as the dashboard URL (the `ray job` convention); `pofa run` on this
        # machine then means a local instance, not a connection to that URL.
        log.warning("RAY_ADDRESS=%s is a Jobs API URL: use `pofa submit` to run there; starting Ray locally",
                    address)
        address = None
    # Workers inherit the driver's sys.path through this, so `pofa` code from a source tree is importable.
    # Every worker turns its first SIGTERM into a checkpoint-and-stop (workers/preemption.py).
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [_repo_root(),
                                                                          os.environ.get("PYTHONPATH")]))},
                   "worker_process_setup_hook": SETUP_HOOK}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        if cfg.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            warnings.warn(f"ray.dashboard_host={cfg.dashboard_host}: the Ray dashboard and Jobs API will accept "
                          "unauthenticated requests that run arbitrary code from anyone who can reach that address")
        # Ray's processes start with SIGTERM blocked: a SIGTERM to the whole process group (a shell's
        # kill, a container stop) reaches the driver alone, which then stops the run in order
        token = mark_instance(instance_record) if instance_record is not None else None  # inherited by all
        for attempt in range(1, LOCAL_START_TRIES + 1):
            unblock = block_sigterm_for_children()
            try:
                ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host=cfg.dashboard_host,
                         runtime_env=runtime_env, log_to_driver=log_to_driver, configure_logging=True,
                         logging_level=logging.WARNING)
                break
            except Exception as exc:  # Ray raises a bare Exception for this
                # Ray gives its raylet a fixed 30 s to register: on a node busy with other work that is not
                # always enough. What the failed start left is stopped (by its token) and it starts again.
                if "timed out during startup" not in str(exc) or attempt == LOCAL_START_TRIES:
                    raise
                log.warning("pofa: the local Ray instance did not come up in time (%s); starting it again (%d of %d)",
                            str(exc).split(".")[0], attempt + 1, LOCAL_START_TRIES)
                ray.shutdown()
                if token is not None:
                    stop_instance(token)
                time.sleep(2)
            finally:
                unblock()
    return ray.get_runtime_context().gcs_address


LOCAL_START_TRIES = 3


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
