"""A throwaway PostgreSQL server for tests: `initdb` + `pg_ctl` in a temp dir, TCP on 127.0.0.1 only."""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

USER = "pofa"


def _tool(name: str) -> Optional[str]:
    """`name` on PATH, else from Debian's versioned directory (its package keeps them off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    return max(candidates, key=lambda p: int(p.split("/")[4])) if candidates else None


def postgres_tools() -> Optional[str]:
    """Why PostgreSQL cannot run here, or None when `initdb` and `pg_ctl` exist."""
    missing = [tool for tool in ("initdb", "pg_ctl") if _tool(tool) is None]
    if missing:
        return (f"PostgreSQL server tools {missing} not found on PATH or in /usr/lib/postgresql/*/bin "
                "(Debian/Ubuntu: apt-get install postgresql)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str

    def uri(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"


def _run_as() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` (or `nobody`) account then."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` account exists")


@contextlib.contextmanager
def running_postgres(password: str = "pg-test-secret") -> Iterator[Postgres]:
    """Start a fresh cluster with password (scram) authentication; stop it and delete it on exit."""
    prefix = _run_as()
    # Under /tmp, not pytest's tmp_path: that one is private to root, and the server may run as another user.
    base = tempfile.mkdtemp(prefix="pofa-pg-")
    data, pwfile, log = (os.path.join(base, n) for n in ("data", "pwfile", "server.log"))
    with open(pwfile, "w") as f:
        f.write(password)
    if prefix:
        user = prefix[2]
        os.chmod(base, 0o700)
        shutil.chown(base, user)
        shutil.chown(pwfile, user)
    port = free_port()

    def run(tool: str, *args: str) -> None:
        done = subprocess.run(prefix + [_tool(tool) or tool, *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            tail = open(log).read()[-2000:] if os.path.exists(log) else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr}\n{tail}")

    try:
        run("initdb", "-D", data, "-U", USER, f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
            "--no-instructions")
        # TCP on loopback only; the unix socket stays inside the data dir. fsync off: a test cluster.
        run("pg_ctl", "start", "-w", "-t", "30", "-D", data, "-l", log,
            "-o", f"-p {port} -h 127.0.0.1 -k {data} -c fsync=off")
        try:
            yield Postgres(port=port, password=password)
        finally:
            subprocess.run(prefix + [_tool("pg_ctl") or "pg_ctl", "stop", "-m", "immediate", "-D", data],
                           capture_output=True, timeout=60)
    finally:
        shutil.rmtree(base, ignore_errors=True)
