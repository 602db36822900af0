"""Run directories on an object store (`s3://bucket/prefix`, `gs://...`) through pyarrow's filesystems.

Every process works on a node-local mirror of the run directory (`RunStore.local`) with plain file
I/O, and the store is the durable copy that any node resumes from:

- `pull` brings remote files the mirror lacks, or has older or of another size, to the mirror;
- `push` uploads the mirror's new or changed files, commit markers (`manifest.json`,
  `MANIFEST.json`) after everything else, so a reader never sees a marker before what it vouches for;
- each file is downloaded to a temporary name and renamed, so processes sharing a mirror never read
  half a file.

For a local or shared-filesystem path, the mirror *is* the run directory: every sync is a no-op,
`publish` is a rename and `fetch` reads in place. This module is the only place that tells the two
apart; everything else calls the same operations whatever the backend.
Credentials come from the environment (AWS_* variables, the node's role), never from the URI.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Optional
from urllib.parse import urlsplit, urlunsplit

from pipelines.atomic import write_json_atomic

MIRROR_ENV = "POFA_MIRROR_DIR"
DEFAULT_MIRROR = f"/tmp/pofa-mirror-{os.getuid()}"  # per user, mode 0700: mirrors hold the run's data
MARKERS = ("manifest.json", "MANIFEST.json")  # written last on push: they declare the rest complete
LEASE_FILE = ".pofa-lease.json"  # which process holds a run on an object store (orchestrator/lease.py)
_NEVER_SYNCED = (".lock", LEASE_FILE)  # per process / written straight to the store
# Written by the driver alone; at run start the stored copy wins over a newer one a node kept (it
# could only be a stray copy, e.g. left by a process that had lost the lease).
STORE_WINS = ("mlflow.db", "tracking.json")
_PARALLEL = 8

_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_filesystems: dict[str, tuple[object, str]] = {}  # per process: building an S3 client costs a round trip


class StorageError(RuntimeError):
    """The object store refused or failed an operation; the message names the store, file and cause."""


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def public_uri(uri: str) -> str:
    """The URI without user info (credentials never belong in one, but never print them if there)."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def mirror_for(uri: str, root: Optional[str] = None) -> str:
    """The node-local mirror of a run URI: `$POFA_MIRROR_DIR/<scheme>/<bucket>/<prefix>` (the same
    path on every node, so a spec built on the driver names it for the workers too)."""
    parts = urlsplit(uri)
    check_no_credentials(uri)
    segments = [s for s in f"{parts.hostname or ''}/{parts.path}".split("/") if s]
    if not segments or any(s in (".", "..") for s in segments):
        raise StorageError(f"run directory URI {public_uri(uri)!r} needs a bucket and a plain prefix (no '.' or '..')")
    base = private_dir(root or os.environ.get(MIRROR_ENV, DEFAULT_MIRROR))
    return os.path.join(base, parts.scheme, *segments)


_SECRET_QUERY = ("access_key", "secret_key", "session_token", "credential", "password", "token")


def check_no_credentials(uri: str) -> None:
    """A URI never carries credentials: they would be printed, logged and saved with it."""
    parts = urlsplit(uri)
    secret_query = [k for k in (q.split("=", 1)[0].lower() for q in parts.query.split("&") if q)
                    if any(word in k for word in _SECRET_QUERY)]
    if parts.username or parts.password or secret_query:
        raise StorageError(f"run directory URI {public_uri(uri)!r} carries credentials "
                           f"({'user info' if parts.username else ', '.join(secret_query)}): give them to every node "
                           "through the environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                           "AWS_PROFILE, or the node's role)")


def private_dir(path: str) -> str:
    """`path` as a directory only this user can enter (created 0700); an existing one that another
    user owns or may write is refused: a mirror holds the run's data and must not be swapped."""
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise StorageError(f"mirror directory {path} is owned by uid {st.st_uid} or writable by others "
                           f"(mode {st.st_mode & 0o777:o}); set {MIRROR_ENV} to a private directory")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def default_exclude(rel: str) -> bool:
    """Never synced: the process lock, temporary names, and Ray Train's own storage."""
    parts = rel.split("/")
    return (parts[-1] in _NEVER_SYNCED or "ray" in parts[:-1]
            or any(p.endswith(".tmp") or p.startswith(".tmp-") for p in parts))


def except_checkpoints(rel: str) -> bool:
    """`default_exclude` plus checkpoints: those travel their own way (each rank its own share)."""
    return default_exclude(rel) or "checkpoints" in rel.split("/")


@dataclass(frozen=True)
class RunStore:
    """Where a run directory lives: `uri` (the durable copy) and `local` (this node's working copy).
    Picklable: specs carry it to Ray workers, which rebuild the filesystem client on first use."""

    uri: str
    local: str
    lease_token: Optional[str] = None  # the driver's lease on an object store: commits check it is still held

    @classmethod
    def open(cls, path_or_uri: str, mirror_root: Optional[str] = None) -> "RunStore":
        if is_uri(path_or_uri):
            return cls(path_or_uri, mirror_for(path_or_uri, mirror_root))
        path = os.path.abspath(os.path.expanduser(path_or_uri.removeprefix("file://")))
        return cls(path, path)

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def display(self) -> str:
        return public_uri(self.uri) if self.remote else self.uri

    # -- paths -----------------------------------------------------------------------------------
    def rel(self, local_path: str) -> Optional[str]:
        """`local_path` relative to the mirror ("" for the root), or None when it lies outside."""
        path, root = os.path.abspath(local_path), os.path.abspath(self.local)
        if path == root:
            return ""
        return os.path.relpath(path, root) if path.startswith(root + os.sep) else None

    def local_path(self, rel: str) -> str:
        return os.path.join(self.local, rel) if rel else self.local

    def where(self, rel: str) -> str:
        """A printable location: the URI (without query or user info) or the local path."""
        return f"{self.display.rstrip('/')}/{rel}" if self.remote else self.local_path(rel)

    def filesystem(self):  # -> (pyarrow.fs.FileSystem, base path inside it)
        # one client per URI and identity: a process that changes its credentials gets a new one
        key = "\0".join([self.uri, *(os.environ.get(v, "") for v in _CLIENT_ENV)])
        if key not in _filesystems:
            from pyarrow import fs

            try:
                _filesystems[key] = fs.FileSystem.from_uri(self.uri)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a bad URI
                raise StorageError(f"cannot open run directory {self.display}: {exc}") from exc
        filesystem, base = _filesystems[key]
        return filesystem, base.rstrip("/")

    def storage_target(self, rel: str) -> tuple[Optional[object], str]:
        """(filesystem, path) for a library that writes `rel` itself (Ray Train's run state): the local
        path with no filesystem on local disk, the store's filesystem and path otherwise."""
        if not self.remote:
            return None, self.local_path(rel)
        return self.filesystem()[0], self.remote_path(rel)

    def remote_path(self, rel: str) -> str:
        _, base = self.filesystem()
        return f"{base}/{rel}" if rel else base

    def _fail(self, what: str, rel: str, exc: BaseException) -> StorageError:
        hint = ""
        text = str(exc)
        if "ACCESS_DENIED" in text.upper() or "AccessDenied" in text or "Forbidden" in text:
            hint = (" — the store refused it: the credentials this process has (AWS_* variables or the node's "
                    "role) may not write there")
        return StorageError(f"object store {self.where(rel)}: could not {what}: {text}{hint}")

    # -- remote operations -----------------------------------------------------------------------
    def listing(self, rel: str = "") -> dict[str, tuple[int, float]]:
        """Files under `rel` (relative to `rel`) -> (size, mtime in seconds)."""
        if not self.remote:
            return _local_listing(self.local_path(rel))
        from pyarrow import fs

        filesystem, _ = self.filesystem()
        base = self.remote_path(rel)
        try:
            infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("list files", rel, exc) from exc
        out = {}
        for info in infos:
            if info.type == fs.FileType.File:
                out[info.path[len(base) + 1:]] = (info.size, info.mtime.timestamp() if info.mtime else 0.0)
        return out

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return os.path.exists(self.local_path(rel))
        from pyarrow import fs

        filesystem, _ = self.filesystem()
        try:
            return filesystem.get_file_info(self.remote_path(rel)).type != fs.FileType.NotFound
        except Exception as exc:  # noqa: BLE001
            raise self._fail("look up", rel, exc) from exc

    def _is_file(self, rel: str) -> bool:
        from pyarrow import fs

        filesystem, _ = self.filesystem()
        try:
            return filesystem.get_file_info(self.remote_path(rel)).type == fs.FileType.File
        except Exception as exc:  # noqa: BLE001
            raise self._fail("look up", rel, exc) from exc

    def upload(self, rel: str, source: Optional[str] = None) -> None:
        """One file to the store at `rel` (a single PUT or multipart upload: never visible half-written);
        `source` defaults to the mirror's copy of `rel`."""
        if not self.remote:
            return
        filesystem, _ = self.filesystem()
        mirrored = source is None
        source = source or self.local_path(rel)
        try:
            with open(source, "rb") as src, filesystem.open_output_stream(self.remote_path(rel)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            info = filesystem.get_file_info(self.remote_path(rel)) if mirrored else None
            if info is not None and info.mtime is not None:  # the mirror copy is now "as new as" the stored one
                stamp = info.mtime.timestamp()
                os.utime(source, (stamp, stamp))
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"write {rel}", rel, exc) from exc

    def download(self, rel: str, mtime: Optional[float] = None, target: Optional[str] = None) -> str:
        """One stored file to the mirror (or `target`), through a temporary name; returns the local path."""
        target = target or self.local_path(rel)
        if not self.remote:
            return target
        filesystem, _ = self.filesystem()
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.part"
        try:
            with filesystem.open_input_stream(self.remote_path(rel)) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            if mtime:
                os.utime(tmp, (mtime, mtime))
            os.replace(tmp, target)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"read {rel}", rel, exc) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def delete(self, rel: str) -> None:
        """A file or a whole folder in the store (commit markers first: a half-deleted folder never
        looks complete)."""
        if not self.remote:
            _delete_local(self.local_path(rel))
            return
        filesystem, _ = self.filesystem()
        names = sorted(self.listing(rel), key=lambda n: os.path.basename(n) not in MARKERS)
        try:
            if not names and self._is_file(rel):  # a lone object (a folder with nothing in it needs nothing)
                filesystem.delete_file(self.remote_path(rel))
            for name in names:
                filesystem.delete_file(self.remote_path(f"{rel}/{name}" if rel else name))
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"delete {rel}", rel, exc) from exc

    def move(self, rel: str, new_rel: str) -> None:
        """A file or folder renamed within the store: a rename on local disk; a server-side copy, then
        delete, per object in an object store (no bytes through this node; not atomic, so callers
        un-commit first)."""
        if not self.remote:
            target = self.local_path(new_rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(self.local_path(rel), target)
            return
        filesystem, _ = self.filesystem()
        names = self.listing(rel)
        try:
            for name in names:
                filesystem.move(self.remote_path(f"{rel}/{name}"), self.remote_path(f"{new_rel}/{name}"))
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"move {rel} to {new_rel}", rel, exc) from exc

    def check_writable(self) -> None:
        """Write, read back and delete a small object: a store that refuses writes fails here, before
        any cluster work, instead of at the first checkpoint hours later."""
        if not self.remote:
            _check_local_writable(self.local)
            return
        filesystem, _ = self.filesystem()
        rel = f".pofa-write-check-{uuid.uuid4().hex[:12]}"
        try:
            with filesystem.open_output_stream(self.remote_path(rel)) as f:
                f.write(b"pofa")
            with filesystem.open_input_stream(self.remote_path(rel)) as f:
                if f.read() != b"pofa":
                    raise OSError("the object read back differs from the one written")
            filesystem.delete_file(self.remote_path(rel))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("write a test object", rel, exc) from exc

    # -- tree sync ---------------------------------------------------------------------------------
    def pull(self, rel: str = "", exclude: Callable[[str], bool] = default_exclude,
             only: Optional[Callable[[str], bool]] = None, prune: bool = False) -> int:
        """Bring the stored files under `rel` that the mirror lacks or holds in an older version; returns
        how many were downloaded. A mirror file newer than the stored one is kept: it holds this
        node's changes not stored yet (pushed next). `prune` also deletes mirror files the store does
        not have (left by an earlier, since redone, attempt), so the mirror reads exactly as the store.
        Paths given to `exclude`/`only` are relative to the run."""
        if not self.remote:
            return 0
        entries = self._entries(rel)
        todo = []
        for full, (size, mtime) in entries.items():
            if exclude(full) or (only is not None and not only(full)):
                continue
            try:
                st = os.stat(self.local_path(full))
                current = st.st_size == size and st.st_mtime >= mtime - 1e-3
                if current or (st.st_mtime > mtime + 1e-3 and full not in STORE_WINS):
                    continue
            except FileNotFoundError:
                pass
            todo.append((full, mtime))
        parallel(lambda item: self.download(*item), todo)
        if prune and os.path.isdir(self.local_path(rel)):
            for name in _local_listing(self.local_path(rel)):
                full = f"{rel}/{name}" if rel else name
                if full not in entries and not exclude(full) and (only is None or only(full)):
                    os.unlink(self.local_path(full))
        return len(todo)

    def _entries(self, rel: str) -> dict[str, tuple[int, float]]:
        """Stored files under `rel` (or `rel` itself when it is a file), relative to the run."""
        listed = {f"{rel}/{name}" if rel else name: info for name, info in self.listing(rel).items()}
        if listed or not rel:
            return listed
        from pyarrow import fs

        filesystem, _ = self.filesystem()
        try:
            info = filesystem.get_file_info(self.remote_path(rel))
        except Exception as exc:  # noqa: BLE001
            raise self._fail("look up", rel, exc) from exc
        if info.type != fs.FileType.File:
            return {}
        return {rel: (info.size, info.mtime.timestamp() if info.mtime else 0.0)}

    def push(self, rel: str = "", exclude: Callable[[str], bool] = default_exclude) -> int:
        """Upload the mirror's files under `rel` that the store lacks (or holds older or of another size),
        commit markers last; returns how many were uploaded."""
        if not self.remote:
            return 0
        stored = self.listing(rel)
        todo = []
        for name, (size, mtime) in _local_listing(self.local_path(rel)).items():
            full = f"{rel}/{name}" if rel else name
            if exclude(full) or name.endswith(".part"):
                continue
            have = stored.get(name)
            if have is not None and have[0] == size and mtime <= have[1] + 1e-3:
                continue
            todo.append(full)
        markers = [f for f in todo if os.path.basename(f) in MARKERS]
        parallel(self.upload, [f for f in todo if f not in markers])
        parallel(self.upload, markers)
        return len(todo)

    def push_files(self, rels: Iterable[str]) -> None:
        """These mirror files (those that exist) to the store, whether changed or not."""
        if self.remote:
            parallel(self.upload, [r for r in rels if os.path.isfile(self.local_path(r))])

    def read_json(self, rel: str) -> object:
        """A small JSON object straight from the store (one GET); ValueError when it is not JSON."""
        if not self.remote:
            with open(self.local_path(rel), "rb") as f:
                return json.loads(f.read())
        filesystem, _ = self.filesystem()
        try:
            with filesystem.open_input_stream(self.remote_path(rel)) as f:
                blob = f.read()
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"read {rel}", rel, exc) from exc
        return json.loads(blob)

    def write_json(self, rel: str, payload: object) -> None:
        """A small JSON object straight to the store (one PUT; locally an atomic write), e.g. a commit
        marker."""
        if not self.remote:
            write_json_atomic(payload, self.local_path(rel))
            return
        filesystem, _ = self.filesystem()
        try:
            with filesystem.open_output_stream(self.remote_path(rel)) as f:
                f.write(json.dumps(payload, indent=1).encode())
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"write {rel}", rel, exc) from exc


    def lease_problem(self) -> Optional[str]:
        """None while this run's lease (if any) is still the one stored; else who took it over. Checked
        before anything is committed, so a process that lost the run never overwrites its new holder."""
        if not self.remote or self.lease_token is None:
            return None
        try:
            lease = self.read_json(LEASE_FILE)
        except (StorageError, ValueError) as exc:
            return f"its lease could not be read ({exc})"
        if not isinstance(lease, dict) or lease.get("token") != self.lease_token:
            holder = lease.get("owner") if isinstance(lease, dict) else "another process"
            return f"the run directory was taken over by {holder}"
        return None

    # -- files staged on this node -----------------------------------------------------------------
    def publish(self, source: str, rel: str) -> None:
        """A finished local file (staged outside its final place) becomes `rel` in the store: a rename
        on local disk, an upload to an object store (the staged copy is then the caller's to remove)."""
        if not self.remote:
            target = self.local_path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(source, target)
            return
        self.upload(rel, source)

    def fetch(self, rel: str, names: Iterable[str], dest: str) -> str:
        """A local folder holding `names` of the stored folder `rel`: read in place on local disk,
        downloaded into `dest` (replaced) from an object store. Returns the folder to read."""
        if not self.remote:
            return self.local_path(rel)
        shutil.rmtree(dest, ignore_errors=True)
        parallel(lambda name: self.download(f"{rel}/{name}", target=os.path.join(dest, name)), list(names))
        return dest

    def discard_fetched(self, folder: str) -> None:
        """Drop what `fetch` downloaded (a folder read in place is left alone)."""
        if self.remote:
            shutil.rmtree(folder, ignore_errors=True)


def _delete_local(path: str) -> None:
    """Markers first, then the rest: a half-deleted folder never looks complete."""
    if os.path.isdir(path) and not os.path.islink(path):
        for base, _, names in os.walk(path):
            for name in names:
                if name in MARKERS:
                    os.unlink(os.path.join(base, name))
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _check_local_writable(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f".pofa-write-check-{uuid.uuid4().hex[:12]}")
    try:
        with open(probe, "wb") as f:
            f.write(b"pofa")
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(f"run directory {folder}: could not write a test file: {exc}") from exc


def _local_listing(folder: str) -> dict[str, tuple[int, float]]:
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            st = os.stat(path)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = (st.st_size, st.st_mtime)
    return out


def parallel(fn: Callable, items: list) -> None:
    """Transfers overlap (pyarrow releases the GIL); the first failure is raised after the rest end."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(_PARALLEL, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()
