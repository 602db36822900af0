"""DeepSpeed's native ops: one build folder and one set of build settings for every pofa process,
built ahead of the run, and a start that never waits forever on a build lock.

DeepSpeed compiles a C++ op the first time a process needs it (torch.utils.cpp_extension.load): ninja
runs in the op's folder under TORCH_EXTENSIONS_DIR, guarded by a `lock` file that torch creates with
O_EXCL, keeps open while it builds and removes when done (torch.utils.file_baton.FileBaton). pofa's
DeepSpeed use needs one op on CPU: `deepspeed_shm_comm`, the shared-memory collective DeepSpeed's
comm backend loads in `deepspeed.initialize` (gloo; ZeRO 0-3, fp32 and bf16 alike). The optimizer is
torch's AdamW passed as a client optimizer (workers/train/engine.py), so no optimizer op (cpu_adam,
fused_adam) is built. On GPU workers DeepSpeed's CUDA accelerator loads no shared-memory op.

What goes wrong without this module:
- a process killed while building leaves `lock`, and every later start waits on it forever, silently
  (FileBaton.wait has no limit);
- processes whose build commands differ rebuild the op in turn. torch runs whichever `ninja` PATH finds
  first: a system ninja 1.11 (build log v5) and the virtualenv's ninja 1.13 (log v7, another command
  hash) each discard the other's `.ninja_log` and recompile everything.

So every pofa process calls `configure()` (the CLI, the tests' conftest, each training worker before
DeepSpeed starts): TORCH_EXTENSIONS_DIR is a folder named after everything that enters the build
commands (Python, torch, DeepSpeed, compiler, ninja and where they are installed) under the cache root
(POFA_OPS_CACHE, default ~/.cache/pofa/ops), CXX names the compiler, and the ninja of pofa's own
environment comes first on PATH. Every load then happens under pofa's build lock (an flock, released
by the kernel when its holder dies) after a stale torch `lock` (no live builder) is removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional, Sequence

CACHE_ENV = "POFA_OPS_CACHE"  # the cache root; one folder per toolchain below it
WAIT_ENV = "POFA_OPS_WAIT_S"  # the longest wait for another process's build
DEFAULT_WAIT_S = 900.0  # the longest honest build: deepspeed_shm_comm takes 1-5 min on 2 busy cores
DEFAULT_ROOT = os.path.join("~", ".cache", "pofa", "ops")
# The op builders (class names of DeepSpeed's CPU accelerator) of the ops pofa's DeepSpeed use loads.
# An op compiled with -march=native (cpu_adam) would also need the CPU model in the folder's name.
BUILDERS = ("ShareMemCommBuilder",)
TORCH_LOCK = "lock"  # torch's FileBaton in the op's folder
POFA_LOCK = ".pofa-build.lock"  # pofa's flock beside it: held through every load by pofa
POLL_S = 0.2

Say = Callable[[str], None]


class NativeOpsError(RuntimeError):
    """The ops cache cannot be used, or a build did not end within the wait limit."""


def _print(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------- the folder and its settings

def cache_root() -> tuple[str, str]:
    """(the cache root, the setting that chose it)."""
    value = os.environ.get(CACHE_ENV)
    if value:
        return os.path.abspath(os.path.expanduser(value)), f"set by {CACHE_ENV}"
    return os.path.expanduser(DEFAULT_ROOT), f"the default, {DEFAULT_ROOT} (set {CACHE_ENV} to choose another)"


@dataclass(frozen=True)
class Toolchain:
    """What enters the build commands of an op, hence the binary and ninja's log."""

    python: str
    torch: str
    deepspeed: str
    cxx: str
    cxx_version: str
    ninja: str
    ninja_version: str
    places: tuple[str, ...]  # where torch, DeepSpeed and Python.h are: absolute paths in every command

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps([self.cxx, self.cxx_version, self.ninja, self.ninja_version,
                                            platform.machine(), *self.places]).encode()).hexdigest()[:10]
        version = self.cxx_version.split()[0] if self.cxx_version else ""
        compiler = re.sub(r"[^\w.+-]", "_", f"{os.path.basename(self.cxx)}{version}")
        return f"{self.python}-torch{self.torch}-ds{self.deepspeed}-{compiler}-{digest}"

    def describe(self) -> str:
        return (f"python {platform.python_version()}, torch {self.torch}, deepspeed {self.deepspeed}, "
                f"{self.cxx} {self.cxx_version or '(not found)'}, ninja {self.ninja_version or '(not found)'} "
                f"({self.ninja})")


def _first_line(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout or "").strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else ""


def _package(name: str) -> tuple[str, str]:
    """(version, folder) of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    folder = os.path.dirname(spec.origin) if spec is not None and spec.origin else ""
    try:
        return importlib.metadata.version(name), folder
    except importlib.metadata.PackageNotFoundError:
        return "none", folder


def _ninja() -> str:
    """pofa's own ninja (a dependency in pyproject.toml: the same binary for every process of this
    environment), else the first on PATH."""
    with contextlib.suppress(ImportError):
        import ninja

        path = os.path.join(getattr(ninja, "BIN_DIR", ""), "ninja")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which("ninja") or "ninja"


@lru_cache(maxsize=None)
def _toolchain(cxx: str) -> Toolchain:
    torch_version, torch_dir = _package("torch")
    ds_version, ds_dir = _package("deepspeed")
    compiler = shutil.which(cxx) or cxx
    ninja = _ninja()
    include = sysconfig.get_path("include", scheme="posix_prefix") or ""
    return Toolchain(python=f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}",
                     torch=torch_version, deepspeed=ds_version, cxx=cxx,
                     cxx_version=_first_line([compiler, "-dumpfullversion", "-dumpversion"]),
                     ninja=ninja, ninja_version=_first_line([ninja, "--version"]),
                     places=(torch_dir, ds_dir, include, compiler))


def toolchain() -> Toolchain:
    return _toolchain(os.environ.get("CXX") or "c++")


def configure() -> str:
    """Give this process (and what it starts) pofa's build settings; returns the extensions folder.
    Touches no file: check_cache() says whether the folder is usable."""
    tc = toolchain()
    folder = os.path.join(cache_root()[0], tc.key)
    os.environ["TORCH_EXTENSIONS_DIR"] = folder
    os.environ["CXX"] = tc.cxx
    ninja_dir = os.path.dirname(tc.ninja)
    if ninja_dir and shutil.which("ninja") != tc.ninja:
        os.environ["PATH"] = os.pathsep.join([ninja_dir, os.environ.get("PATH", "")]).rstrip(os.pathsep)
    return folder


def check_cache() -> str:
    """configure(), then make sure the extensions folder and every op folder in it can be written (a
    load writes its build file and lock there). Raises NativeOpsError naming the folder and the setting."""
    folder = configure()
    root, setting = cache_root()
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f".pofa-write-test-{os.getpid()}"), "w") as probe:
            os.remove(probe.name)
        bad = [e.path for e in os.scandir(folder) if e.is_dir() and not os.access(e.path, os.W_OK | os.X_OK)]
    except OSError as exc:
        raise NativeOpsError(f"the DeepSpeed ops cache {folder} cannot be written ({exc.strerror or exc}); "
                             f"its root {root} is {setting}: point {CACHE_ENV} at a writable folder") from None
    if bad:
        raise NativeOpsError(f"the DeepSpeed ops folder {bad[0]} is not writable by this user; the cache root "
                             f"{root} is {setting}: fix its permissions or point {CACHE_ENV} elsewhere")
    return folder


def wait_limit() -> float:
    value = os.environ.get(WAIT_ENV)
    try:
        return float(value) if value else DEFAULT_WAIT_S
    except ValueError:
        raise NativeOpsError(f"{WAIT_ENV}={value!r} is not a number of seconds") from None


# ----------------------------------------------------------------------------- locks and their builders

def builders_of(op_dir: str) -> list[int]:
    """Processes of this machine that build in `op_dir`: holding its torch lock open (the FileBaton of
    the builder keeps it until it releases) or running in the folder (ninja and the compiler do).
    Processes this user cannot inspect are not counted (they could not write this user's cache)."""
    real = os.path.realpath(op_dir)
    lock = os.path.join(real, TORCH_LOCK)
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        base = f"/proc/{name}"
        try:
            cwd = os.readlink(f"{base}/cwd")
            if cwd == real or cwd.startswith(real + os.sep):
                found.append(int(name))
                continue
            for fd in os.listdir(f"{base}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{base}/fd/{fd}") == lock:
                        found.append(int(name))
                        break
        except OSError:
            continue
    return found


def _who(pids: Sequence[int]) -> str:
    named = []
    for pid in pids[:3]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        named.append(f"pid {pid} ({cmd[:80]})")
    return ", ".join(named) + (f" and {len(pids) - 3} more" if len(pids) > 3 else "")


def _age(path: str) -> Optional[float]:
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except FileNotFoundError:
        return None


def _wait(until: Callable[[], bool], wait_s: float, failure: Callable[[], str]) -> None:
    deadline = time.monotonic() + wait_s
    while not until():
        if time.monotonic() >= deadline:
            raise NativeOpsError(failure())
        time.sleep(POLL_S)


def clear_stale_lock(op_dir: str, wait_s: float, say: Say = _print) -> Optional[str]:
    """torch's build lock in `op_dir`: left alone while a builder of this machine is alive (waited on for
    `wait_s` at most, then NativeOpsError naming the lock and the builder), removed with one line when no
    builder is (returns that line). Call it holding pofa's lock, so no pofa process elsewhere builds."""
    lock = os.path.join(op_dir, TORCH_LOCK)
    if not os.path.exists(lock):
        return None
    holders = builders_of(op_dir)
    if holders and wait_s <= 0:
        raise NativeOpsError(f"{lock}: a build is in progress ({_who(holders)}); left alone")
    if holders:
        say(f"{lock}: a build is in progress ({_who(holders)}); waiting for it, {wait_s:g} s at most")
        _wait(lambda: not os.path.exists(lock) or not builders_of(op_dir), wait_s,
              lambda: (f"{lock}: the build in progress ({_who(builders_of(op_dir))}) did not end within "
                       f"{wait_s:g} s ({WAIT_ENV}); the lock is left alone. Stop that process if it is stuck"))
    age = _age(lock)
    if age is None:
        return None  # its builder finished and removed it
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock)
    line = (f"removed the stale build lock {lock} ({_duration(age)} old): no builder is alive "
            f"(no process holds it or runs in its folder)")
    say(line)
    return line


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@contextlib.contextmanager
def build_lock(op_dir: str, wait_s: float, say: Say = _print) -> Iterator[None]:
    """pofa's lock on an op's folder for one load (and build): one pofa process at a time on every node
    that shares the folder. Released by the kernel if its holder dies, so it never goes stale."""
    path = os.path.join(op_dir, POFA_LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _try_flock(fd):
            if wait_s <= 0:
                raise NativeOpsError(f"{path}: a pofa build is in progress ({_read_owner(path)}); left alone")
            say(f"{op_dir}: another pofa process is loading or building this op ({_read_owner(path)}); "
                f"waiting for it, {wait_s:g} s at most")
            _wait(lambda: _try_flock(fd), wait_s,
                  lambda: (f"{path}: another pofa process ({_read_owner(path)}) held this build lock for "
                           f"{wait_s:g} s ({WAIT_ENV}); stop it if it is stuck"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return True  # a filesystem without locks: the stale-lock check alone applies
        raise


def _read_owner(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "owner unknown"
    except OSError:
        return "owner unknown"


# ----------------------------------------------------------------------------- building and loading

@dataclass
class OpLoad:
    name: str
    folder: str
    compiled: bool
    seconds: float


def op_builders(cpu: bool = False) -> list[Any]:
    """DeepSpeed's builders of the ops in BUILDERS that this platform can build: those of the CPU
    accelerator (`cpu`: what CPU workers load, built ahead on any machine), else of DeepSpeed's current
    accelerator (what this process's `deepspeed.initialize` will load)."""
    if cpu:
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        accelerator = CPU_Accelerator()
    else:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    found = [accelerator.create_op_builder(name) for name in BUILDERS]
    return [b for b in found if b is not None and b.is_compatible(verbose=False)]


def _marks(op_dir: str, name: str) -> tuple[Any, ...]:
    """What a compile changes: ninja's log and the library."""
    out = []
    for path in (os.path.join(op_dir, ".ninja_log"), os.path.join(op_dir, f"{name}.so")):
        try:
            st = os.stat(path)
            out.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def ensure_ops(builders: Optional[Sequence[Any]] = None, say: Say = _print,
               wait_s: Optional[float] = None) -> list[OpLoad]:
    """Load (building where needed) each op under pofa's build lock, after clearing a stale torch lock.
    Call before `deepspeed.initialize`: DeepSpeed then finds the ops loaded. Default: the ops this
    process's DeepSpeed will load (none on a GPU worker)."""
    hint = "; `pofa doctor --build-ops` builds it ahead" if builders is None else ""
    builders = op_builders() if builders is None else builders
    if not builders:
        configure()
        return []
    wait_s = wait_limit() if wait_s is None else wait_s
    done = []
    for builder in builders:
        name = builder.NAME
        with _guarded(name, wait_s, say) as op_dir:
            before = _marks(op_dir, name)
            if before[1] is None:
                say(f"building DeepSpeed's {name} op in {op_dir} (first use with this toolchain{hint})")
            start = time.monotonic()
            builder.load(verbose=False)
            done.append(OpLoad(name, op_dir, _marks(op_dir, name) != before, time.monotonic() - start))
    return done


@contextlib.contextmanager
def _guarded(name: str, wait_s: float, say: Say) -> Iterator[str]:
    """The op's folder, held by pofa's build lock, with no stale torch lock left in it."""
    op_dir = os.path.join(check_cache(), name)
    os.makedirs(op_dir, exist_ok=True)
    with build_lock(op_dir, wait_s, say):
        clear_stale_lock(op_dir, wait_s, say)
        yield op_dir


def build_ops(say: Say = _print, wait_s: Optional[float] = None) -> list[OpLoad]:
    """Build ahead every op pofa's CPU workers load (the machine needs no GPU)."""
    return ensure_ops(op_builders(cpu=True), say=say, wait_s=wait_s)


def clear_stale_locks(say: Say = _print) -> list[str]:
    """Every op folder's stale torch lock removed (one line each); a build in progress is reported and
    left alone, without waiting."""
    folder = check_cache()
    lines = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, TORCH_LOCK)):
            try:
                with build_lock(entry.path, 0.0, say):
                    line = clear_stale_lock(entry.path, 0.0, say)
            except NativeOpsError as exc:
                line = str(exc)
                say(line)
            if line:
                lines.append(line)
    return lines


def pending_commands(timeout_s: Optional[float] = None) -> dict[str, list[str]]:
    """For each op pofa builds ahead, the commands loading it in a fresh process with pofa's settings
    would run ([]: it loads without compiling). A subprocess runs DeepSpeed's own loader with ninja in
    dry-run mode (`ninja -n`) and no import, so this compiles nothing and changes no state here."""
    configure()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    limit = (wait_limit() if timeout_s is None else timeout_s) + 300
    try:
        done = subprocess.run([sys.executable, "-m", "workers.native_ops", "pending"], env=env, capture_output=True,
                              text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise NativeOpsError(f"checking the DeepSpeed ops took more than {limit:g} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise NativeOpsError(f"checking the DeepSpeed ops failed: {(done.stderr or done.stdout)[-2000:]}")
    return json.loads(lines[-1])


def _pending_here() -> dict[str, list[str]]:
    """In a throwaway process: torch's loader as DeepSpeed calls it, ninja asked what it would run."""
    import torch.utils.cpp_extension as cpp_extension

    would: list[str] = []

    def dry_run(build_directory: str, verbose: bool, error_prefix: str) -> None:
        done = subprocess.run(["ninja", "-n", "-v"], cwd=build_directory, capture_output=True, text=True,
                              env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(f"{error_prefix}: {done.stdout}{done.stderr}")
        would.extend(line.split("] ", 1)[1] for line in done.stdout.splitlines()
                     if line.startswith("[") and "] " in line)  # `[1/3] c++ ...`; none: "no work to do"

    cpp_extension._run_ninja_build = dry_run
    cpp_extension._import_module_from_library = lambda *args, **kwargs: None
    pending = {}
    for builder in op_builders(cpu=True):
        with _guarded(builder.NAME, wait_limit(), lambda line: print(line, file=sys.stderr, flush=True)):
            would.clear()
            builder.jit_load(verbose=False)
            pending[builder.NAME] = list(would)
    return pending


if __name__ == "__main__":
    if sys.argv[1:] == ["pending"]:
        print(json.dumps(_pending_here()))
    else:
        sys.exit("usage: python -m workers.native_ops pending")
