"""The file system under a store: a local folder or any fsspec URL (``s3://``, ``gs://``, ...).

Everything the store does besides zarr's own array I/O goes through one :class:`StoreFS`,
addressed by *keys* relative to the store root (``markers/00003.json``):

* :meth:`~StoreFS.read_bytes`, :meth:`~StoreFS.exists`, :meth:`~StoreFS.size`, :meth:`~StoreFS.list`,
  :meth:`~StoreFS.files` (recursive), :meth:`~StoreFS.delete`;
* :meth:`~StoreFS.write_atomic`: readers see the old object or the whole new one;
* :meth:`~StoreFS.create_once`: publish an object unless it exists, atomically (one of many
  racing writers wins);
* :meth:`~StoreFS.claim`: become the single writer of a shard (a lease), see below;
* :meth:`~StoreFS.zarr_store`: the zarr store of a key (a path for zarr's local store, an
  ``FsspecStore`` elsewhere).

Two implementations, chosen by the root (:func:`store_fs`):

* :class:`LocalFS` (plain paths and ``file://``) keeps the POSIX semantics the store always
  had: atomic rename for writes, a hard link for create-once, and ``flock`` for claims (the
  kernel drops it when its holder dies, so a crashed writer never blocks anybody).
* :class:`RemoteFS` (any other fsspec protocol): an object PUT is atomic by itself;
  create-once is a conditional write (S3 ``If-None-Match: *``, fsspec ``mode="create"``);
  claims are **leases** (:class:`Lease`): ``locks/<shard>.lock/<generation>.json`` objects created
  once, renewed by a heartbeat thread, taken over by creating the next generation once they
  expire. The protocol and what happens when writers race: docs/storage.md.

Storage options (credentials, endpoint) come from ``storage_options`` (config / CLI) or the
environment as the fsspec implementation reads it (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ... for s3fs). A missing implementation (s3fs, gcsfs) is a
:class:`~pipeline.errors.StoreError` with the install command, raised when the store is first
named, before any work.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar, Union

from pipeline.errors import FreezeframeError, StoreError
from pipeline.fileio import atomic_write_bytes

#: fsspec protocol -> (the package that implements it, the ``pip install`` argument)
OPTIONAL_FS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3fs  (or: pip install 'freezeframe[s3]')"),
    "s3a": ("s3fs", "s3fs  (or: pip install 'freezeframe[s3]')"),
    "gs": ("gcsfs", "gcsfs  (or: pip install 'freezeframe[gcs]')"),
    "gcs": ("gcsfs", "gcsfs  (or: pip install 'freezeframe[gcs]')"),
    "az": ("adlfs", "adlfs"),
    "abfs": ("adlfs", "adlfs"),
}

#: default lease of a remote claim, seconds (``extract --set lease_seconds=...``)
DEFAULT_LEASE_S = 60.0


def split_protocol(root: str | os.PathLike) -> tuple[str, str]:
    """``("s3", "bucket/x.zarr")`` for ``s3://bucket/x.zarr``; ``("", path)`` for a local path
    (``file://`` included)."""
    s = os.fspath(root)
    if "://" not in s:
        return "", s
    protocol, rest = s.split("://", 1)
    return ("", rest) if protocol == "file" else (protocol, rest.rstrip("/"))


def require_protocol(protocol: str, url: str, *, what: str = "stores",
                     packages: Mapping[str, tuple[str, str]] | None = None,
                     missing: type[FreezeframeError] = StoreError) -> type:
    """The fsspec file-system class of ``protocol``; a ``missing`` error with the install
    command when its package is missing (s3fs, gcsfs; ``packages`` maps protocol -> (package,
    pip argument), default :data:`OPTIONAL_FS`), a :class:`StoreError` when the protocol is
    unknown. ``what`` names the use in the message ("stores", "URLs")."""
    import fsspec  # lazy: local stores never need it at import time

    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        pkg, pip = (OPTIONAL_FS if packages is None else packages).get(protocol, (None, None))
        how = f"pip install {pip}" if pip else f"install the fsspec implementation of {protocol}:// ({e})"
        raise missing(f"{url}: {protocol}:// {what} need {pkg or 'an fsspec implementation'}, which is not "
                      f"installed; {how}") from None
    except ValueError:
        raise StoreError(f"{url}: unknown protocol {protocol!r}; use a local path or an fsspec URL "
                         "(s3://, gs://, file://, ...)") from None


# --------------------------------------------------------------------------------------
# claims
# --------------------------------------------------------------------------------------
@dataclass
class Claim:
    """The outcome of :meth:`StoreFS.claim`: ``held`` while this process is the writer.

    When not held, ``holder`` says who is (for messages) and ``expires`` when its lease runs
    out (wall-clock seconds since the epoch; None for a ``flock``, which lasts exactly as long
    as its holder lives: there is nothing to wait for).
    """

    held: bool
    holder: str = ""
    expires: float | None = None
    lost: bool = False  # a held lease that another writer took over (heartbeats too late)
    _lease: "Lease | None" = field(default=None, repr=False)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if this process no longer holds the claim (call it right
        before committing, i.e. before the completion marker)."""
        if self._lease is not None:
            self._lease.verify()
        if self.lost or (self._lease is not None and self._lease.lost):
            key = self._lease.key if self._lease else "?"
            raise LeaseLost(f"lost the claim on {key} to {self.holder or 'another writer'} (no heartbeat for longer "
                            "than the lease: a pause or a stalled network; raise --set lease_seconds); the new "
                            "holder redoes the shard")


class LeaseLost(StoreError):
    """Another writer took over a shard whose lease this process let expire."""


def _owner() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


# --------------------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------------------
class StoreFS(ABC):
    """A store root on some file system; every method takes a key relative to the root."""

    root: str  # as the user named it (messages)

    @abstractmethod
    def path(self, key: str = "") -> Any:
        """What names ``key`` in messages and for other libraries: a :class:`Path` locally, a URL remotely."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object (:class:`FileNotFoundError` if missing)."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Bytes of a file, None if it is missing (or a folder)."""

    @abstractmethod
    def list(self, key: str) -> list[str]:
        """Names (not keys) of the entries directly under folder ``key``, sorted; [] if none."""

    @abstractmethod
    def files(self, key: str) -> dict[str, int]:
        """Every file under folder ``key``, recursively: relative POSIX path -> bytes (sorted;
        hidden names, i.e. temporaries, left out)."""

    @abstractmethod
    def write_atomic(self, key: str, data: bytes) -> None:
        """Publish ``data`` at ``key``: readers see the old object or the whole new one."""

    @abstractmethod
    def create_once(self, key: str, data: bytes) -> bool:
        """Publish ``data`` at ``key`` unless it exists; True if this call created it. Atomic:
        of many racing callers exactly one wins and the others read its bytes whole."""

    @abstractmethod
    def delete(self, key: str, *, recursive: bool = False) -> None:
        """Remove a file (or, ``recursive``, a folder and everything under it); missing is fine."""

    @abstractmethod
    def makedirs(self, key: str) -> None:
        """Create folder ``key`` (a no-op on object stores, where folders are prefixes)."""

    @abstractmethod
    def zarr_store(self, key: str = "", *, read_only: bool = False) -> Any:
        """What ``zarr.open_group`` / ``zarr.open_array`` take for the node at ``key``."""

    @abstractmethod
    def claim(self, key: str, *, lease_s: float = DEFAULT_LEASE_S) -> Any:
        """Context manager: try to become the single writer of ``key`` (a shard); yields a
        :class:`Claim`, at once, without waiting."""

    @abstractmethod
    def claimed(self, key: str) -> Claim:
        """Whether someone holds the claim on ``key`` now (``held`` = a live holder)."""

    # ---- helpers on top ------------------------------------------------------------------
    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def read_many(self, keys: list[str]) -> list[bytes | BaseException]:
        """Each object's bytes, or the exception reading it raised (in order)."""
        out: list[bytes | BaseException] = []
        for k in keys:
            try:
                out.append(self.read_bytes(k))
            except OSError as e:
                out.append(e)
        return out

    def open_read(self, key: str) -> Any:
        """A binary file object of ``key`` (hashing big files without reading them whole)."""
        return open(self.path(key), "rb")

    def __str__(self) -> str:
        return self.root


StoreRoot = Union[str, os.PathLike, StoreFS]


# --------------------------------------------------------------------------------------
# local (POSIX) stores
# --------------------------------------------------------------------------------------
class LocalFS(StoreFS):
    """A store in a local or shared POSIX folder: rename, hard link and ``flock``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.base = Path(split_protocol(root)[1])
        self.root = str(self.base)

    def path(self, key: str = "") -> Path:
        return self.base / key if key else self.base

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def size(self, key: str) -> int | None:
        p = self.path(key)
        return p.stat().st_size if p.is_file() else None

    def list(self, key: str) -> list[str]:
        d = self.path(key)
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    def files(self, key: str) -> dict[str, int]:
        root = self.path(key)
        out = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                out[rel.as_posix()] = p.stat().st_size
        return out

    def write_atomic(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.path(key), data)

    def create_once(self, key: str, data: bytes) -> bool:
        # written whole under a private name, then hard-linked (atomic, fails if present)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the link publishes whole bytes, even after a power cut
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str, *, recursive: bool = False) -> None:
        p = self.path(key)
        if recursive and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def makedirs(self, key: str) -> None:
        self.path(key).mkdir(parents=True, exist_ok=True)

    def zarr_store(self, key: str = "", *, read_only: bool = False) -> str:
        return str(self.path(key))

    @contextmanager
    def claim(self, key: str, *, lease_s: float = DEFAULT_LEASE_S) -> Iterator[Claim]:
        with file_lock(self.path(key)) as held:
            yield Claim(True) if held else Claim(False, holder=_read_holder(self.path(key)))

    def claimed(self, key: str) -> Claim:
        held = file_locked(self.path(key))
        return Claim(held, holder=_read_holder(self.path(key)) if held else "")


def _read_holder(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Try to take the advisory ``flock`` on ``path`` (created if missing): yields True while
    this process holds it, False (at once, without waiting) when another process holds it.

    The kernel drops the lock when its holder exits, even by SIGKILL, so a crashed process
    never leaves a stale lock. The file names the holder (host, pid) for people looking.
    (``flock`` is reliable on local disks and most cluster file systems.) Used for store
    shards (:meth:`LocalFS.claim`) and training run directories.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{_owner()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


def file_locked(path: str | os.PathLike) -> bool:
    """Whether a live process holds the :func:`file_lock` on ``path``."""
    if not Path(path).exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------
# remote (fsspec) stores
# --------------------------------------------------------------------------------------
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(method: F) -> F:
    """Errors of the remote service that a user fixes (credentials, a missing bucket, a wrong
    endpoint) as a one-line :class:`StoreError`; "not found" / "exists" pass through (they are
    answers, not failures)."""

    @functools.wraps(method)
    def wrapper(self: "RemoteFS", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (FileNotFoundError, FileExistsError, StoreError):
            raise
        except Exception as e:  # botocore/aiohttp/PermissionError...: the service refused or is unreachable
            raise StoreError(f"{self.root}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check "
                             "the credentials, bucket and endpoint (environment: AWS_ENDPOINT_URL, "
                             "AWS_ACCESS_KEY_ID, ...; or --storage-option key=value)") from e

    return wrapper  # type: ignore[return-value]


class RemoteFS(StoreFS):
    """A store under an fsspec URL (``s3://bucket/x.zarr``): object writes, conditional
    creates, lease claims. Directory listings are never cached (other writers change them)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        protocol, base = split_protocol(url)
        cls = require_protocol(protocol, url)
        self.protocol, self.base = protocol, base
        self.root = f"{protocol}://{base}"
        self.options = dict(storage_options or {})
        self._cls, self._fs, self._pid = cls, None, -1

    @property
    def fs(self) -> Any:
        """The fsspec file system, made anew in a forked child (DataLoader workers): an
        instance is bound to its creator's event loop."""
        if self._pid != os.getpid():
            self._fs = self._cls(**{"use_listings_cache": False, "skip_instance_cache": True, **self.options})
            self._pid = os.getpid()
        return self._fs

    def _p(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def path(self, key: str = "") -> str:
        return f"{self.protocol}://{self._p(key)}"

    @_user_errors
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._p(key)))

    @_user_errors
    def read_bytes(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(self._p(key)))

    @_user_errors
    def size(self, key: str) -> int | None:
        try:
            info = self.fs.info(self._p(key))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    @_user_errors
    def list(self, key: str) -> list[str]:
        try:
            entries = self.fs.ls(self._p(key), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        prefix = self._p(key).rstrip("/") + "/"
        return sorted({e[len(prefix):].split("/")[0] for e in entries if e.startswith(prefix)} - {""})

    @_user_errors
    def files(self, key: str) -> dict[str, int]:
        prefix = self._p(key).rstrip("/") + "/"
        try:
            found = self.fs.find(self._p(key), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in sorted(found.items()):
            rel = name[len(prefix):] if name.startswith(prefix) else name
            if info.get("type", "file") == "file" and not any(p.startswith(".") for p in rel.split("/")):
                out[rel] = int(info["size"])
        return out

    @_user_errors
    def write_atomic(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(key), data)  # one PUT: the object appears whole

    @_user_errors
    def create_once(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")  # S3: If-None-Match: *
            return True
        except FileExistsError:
            return False

    @_user_errors
    def delete(self, key: str, *, recursive: bool = False) -> None:
        try:
            self.fs.rm(self._p(key), recursive=recursive)
        except FileNotFoundError:
            pass

    def makedirs(self, key: str) -> None:
        pass  # prefixes exist when objects do

    def zarr_store(self, key: str = "", *, read_only: bool = False) -> Any:
        from zarr.storage import FsspecStore  # lazy: only remote stores need it

        return FsspecStore.from_url(self.path(key), storage_options=self.options, read_only=read_only)

    def open_read(self, key: str) -> Any:
        return self.fs.open(self._p(key), "rb")

    @_user_errors
    def read_many(self, keys: list[str]) -> list[bytes | BaseException]:
        if not keys:
            return []
        paths = [self._p(k) for k in keys]
        got = self.fs.cat(paths, on_error="return")  # concurrent GETs
        return [got.get(p, FileNotFoundError(p)) for p in paths]

    @contextmanager
    def claim(self, key: str, *, lease_s: float = DEFAULT_LEASE_S) -> Iterator[Claim]:
        lease = Lease(self, key, lease_s)
        claim = lease.acquire()
        if not claim.held:
            yield claim
            return
        lease.start_heartbeat()
        try:
            yield claim
        finally:
            lease.release()

    def claimed(self, key: str) -> Claim:
        latest = Lease(self, key, DEFAULT_LEASE_S).latest()
        if latest is None:
            return Claim(False)
        _, rec = latest
        alive = float(rec.get("expires", 0)) > time.time()
        return Claim(alive, holder=str(rec.get("owner", "")), expires=float(rec.get("expires", 0)))


class Lease:
    """A lease on ``<key>/`` of a remote store (``locks/<shard>.lock/``, docs/storage.md).

    Generation g of a claim is the object ``<key>/<g:06d>.json`` = ``{"owner",
    "token", "expires"}``, created once (conditional write). A claimant reads the latest
    generation: none -> it creates generation 0; one whose ``expires`` has passed -> it
    creates g + 1 (a takeover); a live one -> busy. Of writers racing for the same generation
    exactly one create succeeds. The holder renews ``expires`` every ``lease_s / 4`` by
    rewriting its own object, and notices a takeover (a newer generation) at each renewal and
    in :meth:`verify`, called before its completion marker.
    """

    def __init__(self, fs: RemoteFS, key: str, lease_s: float) -> None:
        self.fs, self.key, self.lease_s = fs, key, float(lease_s)
        self.dir = key
        self.token = uuid.uuid4().hex
        self.gen: int | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _gen_key(self, gen: int) -> str:
        return f"{self.dir}/{gen:06d}.json"

    def _record(self) -> bytes:
        return json.dumps({"owner": _owner(), "token": self.token,
                           "expires": time.time() + self.lease_s, "lease_s": self.lease_s}).encode()

    def latest(self) -> tuple[int, dict] | None:
        """(generation, record) of the newest claim object, None if there is none."""
        gens = sorted(int(n[:-5]) for n in self.fs.list(self.dir) if n.endswith(".json") and n[:-5].isdigit())
        for g in reversed(gens):
            try:
                return g, json.loads(self.fs.read_bytes(self._gen_key(g)))
            except (FileNotFoundError, ValueError):
                continue  # deleted or being replaced: look at the previous one
        return None

    def acquire(self) -> Claim:
        latest = self.latest()
        if latest is None:
            gen = 0
        else:
            g, rec = latest
            if float(rec.get("expires", 0)) > time.time():
                return Claim(False, holder=str(rec.get("owner", "")), expires=float(rec["expires"]))
            gen = g + 1  # expired: take it over
        if not self.fs.create_once(self._gen_key(gen), self._record()):
            rec = self.latest()
            r = rec[1] if rec else {}
            return Claim(False, holder=str(r.get("owner", "")), expires=float(r.get("expires", time.time())))
        self.gen = gen
        self.claim = Claim(True, holder=_owner(), _lease=self)
        return self.claim

    def verify(self) -> None:
        """Mark the lease lost if a newer generation exists (someone took it over)."""
        latest = self.latest()
        if latest is not None and (latest[0] != self.gen or latest[1].get("token") != self.token):
            self.lost = True
            self.claim.lost = True
            self.claim.holder = str(latest[1].get("owner", ""))

    def renew(self) -> None:
        self.verify()
        if not self.lost:
            self.fs.write_atomic(self._gen_key(self.gen), self._record())  # type: ignore[arg-type]

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.lease_s / 4):
                try:
                    self.renew()
                except Exception:  # a transient error: the next beat tries again
                    continue
                if self.lost:
                    return

        self._thread = threading.Thread(target=beat, name=f"ff-lease-{self.key}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and mark the lease expired so that anyone may take the shard at once
        (a finished shard has its marker, which wins over any claim)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.gen is not None and not self.lost:
            rec = {"owner": _owner(), "token": self.token, "expires": 0.0, "released": True}
            try:
                self.fs.write_atomic(self._gen_key(self.gen), json.dumps(rec).encode())
            except Exception:
                pass  # the lease simply runs out


# --------------------------------------------------------------------------------------
# choosing one
# --------------------------------------------------------------------------------------
_REMOTE: dict[str, RemoteFS] = {}
_OPTIONS: dict[str, dict[str, Any]] = {}
_LOCK = threading.Lock()


def store_fs(root: StoreRoot, storage_options: Mapping[str, Any] | None = None) -> StoreFS:
    """The :class:`StoreFS` of a store root: a :class:`LocalFS` for paths and ``file://``, a
    :class:`RemoteFS` for other fsspec URLs (one instance per URL and options per process).

    ``storage_options`` given once for a URL are remembered for later calls that give none
    (``status``, ``verify`` and readers in the same process), the environment fills in the
    rest. A missing s3fs/gcsfs is a :class:`StoreError` naming the install command.
    """
    if isinstance(root, StoreFS):
        return root
    protocol, _ = split_protocol(root)
    if not protocol:
        return LocalFS(root)
    url = os.fspath(root).rstrip("/")
    with _LOCK:
        if storage_options is not None:
            _OPTIONS[url] = dict(storage_options)
        opts = _OPTIONS.get(url, {})
        key = url + "\0" + json.dumps(opts, sort_keys=True, default=str)
        if key not in _REMOTE:
            _REMOTE[key] = RemoteFS(url, opts)
        return _REMOTE[key]
