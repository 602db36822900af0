"""Calls that need the tracking store, kept in order while it does not answer and made once it does.

The run never stops for MLflow: a call the store cannot take now is kept, a thread retries the
oldest with backoff, and the rest follow it in order. At the end of the run `settle` lets them
through while the store is taking them (the process exits next).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, TypeVar

from orchestrator.tracking.config import TrackingConfig
from orchestrator.tracking.connection import TrackingMisconfigured, TrackingUnreachableError

logger = logging.getLogger("pofa.tracking")
T = TypeVar("T")


class KeptCalls:
    def __init__(self, config: TrackingConfig, where: str) -> None:
        self.config, self.where = config, where  # `where`: the store's address, without credentials
        self._lock = threading.Lock()
        self._waiting: list[Callable[[], Any]] | None = None  # None: the store answers
        self._delivered = 0  # kept calls the store took once it answered again

    def call(self, call: Callable[[], T]) -> T | None:
        """Made now, or, while the store does not answer, kept and made in order once it does (None is
        returned then). A misconfigured store still fails at once."""
        with self._lock:
            if self._waiting is not None:
                self._waiting.append(call)
                return None
        try:
            return call()
        except TrackingMisconfigured:
            raise
        except TrackingUnreachableError as exc:
            with self._lock:
                first = self._waiting is None
                self._waiting = (self._waiting or []) + [call]
            if first:
                logger.warning("pofa: %s The run goes on: its MLflow records are kept and delivered, in order, "
                               "when the store answers (retrying with backoff up to %g s).", exc,
                               self.config.retry_max_s)
                threading.Thread(target=self._deliver_later, name="pofa-tracking-reconnect", daemon=True).start()
            return None

    def settle(self, answered_before: bool) -> int:
        """At the end of the run: while the store is back and taking the kept calls, wait for them;
        returns how many are left. A store that never answered again costs no wait; one that stops
        taking them, at most 2 x retry_max_s + connect_timeout_s."""
        patience = 2 * self.config.retry_max_s + self.config.connect_timeout_s
        seen, progress_at = -1, time.monotonic()
        while True:
            with self._lock:
                left = len(self._waiting) if self._waiting is not None else 0
                delivered = self._delivered
            if not left or (not delivered and not answered_before):
                return left
            if delivered != seen:
                seen, progress_at = delivered, time.monotonic()
            elif time.monotonic() - progress_at > patience:
                return left
            time.sleep(0.05)

    def _deliver_later(self) -> None:
        delay = self.config.retry_initial_s
        while True:
            with self._lock:
                if not self._waiting:
                    self._waiting = None
                    logger.warning("pofa: MLflow at %s answers again; the kept records are being delivered",
                                   self.where)
                    return
                call = self._waiting[0]
            try:
                call()
            except TrackingUnreachableError:
                time.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_s)
                continue
            except Exception as exc:  # noqa: BLE001 - one call the store refuses must not block the rest
                logger.warning("pofa: a kept MLflow call failed and is dropped: %s", exc)
            with self._lock:
                self._waiting.pop(0)
                self._delivered += 1
            delay = self.config.retry_initial_s
