"""One pofa process per run directory on an object store, across machines.

A file lock only guards one machine. For a run directory in a bucket the holder keeps a lease object
(`.pofa-lease.json`: owner, token, heartbeat) fresh from a background thread. Another process that
finds a lease waits while it watches it: a heartbeat that moves means the holder is alive (refused,
naming it); a lease left by a killed process expires after `POFA_LEASE_S` seconds (default 60) and
is taken over, so rerunning the command after a crash needs no manual clean-up.

Object stores have no compare-and-swap here, so two processes starting within the same second could
both write; each reads the lease back after writing and the one whose token is not there stops.
"""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from workers.storage import LEASE_FILE, RunStore, StorageError

LEASE = LEASE_FILE
LEASE_ENV = "POFA_LEASE_S"


class LeaseHeld(RuntimeError):
    pass


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, "60"))


class Lease:
    def __init__(self, store: RunStore, console: Callable[[str], None] = print) -> None:
        self.store = store
        self.console = console
        self.ttl = lease_seconds()
        self.token = uuid.uuid4().hex
        self.owner = f"pid {os.getpid()} on {socket.gethostname()}"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None  # why the lease is no longer this process's

    def _read(self) -> Optional[dict]:
        if not self.store.exists(LEASE):
            return None
        try:
            lease = self.store.read_json(LEASE)
        except ValueError:
            return None  # a foreign object: treated as no lease
        except StorageError:
            if not self.store.exists(LEASE):
                return None  # released between the two requests
            raise
        return lease if isinstance(lease, dict) else None

    def _write(self) -> None:
        self.store.write_json(LEASE, {"owner": self.owner, "token": self.token, "heartbeat": time.time(),
                                      "ttl_s": self.ttl})

    def acquire(self) -> None:
        """Take the lease, waiting out one left by a process that is gone; refuse a live holder."""
        current = self._read()
        if current is not None and current.get("token") != self.token:
            seen = current.get("heartbeat")
            deadline = time.monotonic() + self.ttl
            waiting_said = False
            while time.monotonic() < deadline and time.time() - float(seen or 0) < self.ttl:
                if not waiting_said:
                    self.console(f"pofa: run directory lease held by {current.get('owner')}; waiting up to "
                                 f"{self.ttl:.0f} s to see whether it is still alive")
                    waiting_said = True
                time.sleep(min(self.ttl / 6, 5.0))
                current = self._read()
                if current is None:
                    break
                if current.get("heartbeat") != seen:
                    raise LeaseHeld(f"run directory {self.store.display} is in use by {current.get('owner')} "
                                    "(its lease is being renewed); wait for it to finish or choose another "
                                    "--run-dir")
        self._write()
        time.sleep(min(1.0, self.ttl / 10))  # a concurrent writer's object is visible by now
        current = self._read()
        if current is None or current.get("token") != self.token:
            raise LeaseHeld(f"run directory {self.store.display} was just taken by "
                            f"{(current or {}).get('owner', 'another process')}")
        self._thread = threading.Thread(target=self._renew, name="pofa-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                current = self._read()
                if current is not None and current.get("token") != self.token:
                    # another process took the run over (this one stalled past the expiry): never write
                    # over its lease; the commits of this process check `lost` and stop
                    self.lost = f"taken over by {current.get('owner')}"
                    self.console(f"pofa: error: the run directory lease was {self.lost}; this process stops "
                                 "without committing anything more")
                    return
                self._write()
            except StorageError as exc:  # a blip must not kill a days-long run; expiry needs 3 in a row
                self.console(f"pofa: warning: could not renew the run directory lease: {exc}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            try:
                current = self._read()
                if current is not None and current.get("token") == self.token:
                    self.store.delete(LEASE)
            except StorageError:
                pass  # it expires on its own
