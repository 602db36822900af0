"""How pofa retries a tracking store that is down: one policy, built on tenacity.

Two callers: stage-boundary calls of `TrackingSession` (create a run, mark it finished) go through
`retry_transient`, which gives up after `boundary_retry_s`; the background sender of
`AsyncMlflowTracker` keeps its records and retries until the store is back. Both wait by `backoff`.
"""
from __future__ import annotations

import logging
from typing import Callable, TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential,
)
from tenacity.nap import sleep as _tenacity_sleep

from orchestrator.tracking.config import shown
from orchestrator.tracking.connection import TrackingUnreachableError

logger = logging.getLogger("pofa.tracking")
T = TypeVar("T")


def backoff(initial_s: float, max_s: float) -> wait_exponential:
    """Wait `initial_s`, then twice as long each time, at most `max_s`.

    No jitter: a run has a handful of clients per store, not a crowd that must be spread out.
    """
    return wait_exponential(multiplier=initial_s, max=max_s)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the store is down or busy, not refusing the request itself."""
    from mlflow.exceptions import MlflowException  # lazily: importing MLflow takes seconds

    if isinstance(exc, MlflowException):
        return exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
                                      "UNAUTHENTICATED", "PERMISSION_DENIED")  # wrong credentials: fail now
    # OSError: connection failures below MLflow; OperationalError: a locked SQLite database.
    return isinstance(exc, OSError) or type(exc).__name__ == "OperationalError"


def retry_transient(
    call: Callable[[], T],
    *,
    what: str,
    uri: str,
    initial_s: float,
    max_s: float,
    give_up_after_s: float,
    sleep: Callable[[float], None] = _tenacity_sleep,
) -> T:
    """`call()`, retried with `backoff` while it fails with an `is_transient` error.

    Any other error is raised at once. Warns once, at the first retry. Gives up with
    TrackingUnreachableError as soon as the next wait would end past `give_up_after_s`.
    `what` completes "could not ..." in the messages; `sleep` is for tests.
    """

    def warn_once(state: RetryCallState) -> None:
        if state.attempt_number == 1 and state.outcome is not None:
            logger.warning("pofa: MLflow at %s failed to %s (%s); retrying", shown(uri), what,
                           str(state.outcome.exception())[:200])

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=backoff(initial_s, max_s),
        stop=stop_before_delay(give_up_after_s),
        before_sleep=warn_once,
        sleep=sleep,
    )
    try:
        return retrying(call)
    except RetryError as gave_up:
        exc = gave_up.last_attempt.exception()
        raise TrackingUnreachableError(
            f"could not {what} in MLflow at {shown(uri)} within {give_up_after_s:g} s: {str(exc)[:300]}"
        ) from exc
