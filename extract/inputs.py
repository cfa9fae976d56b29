"""Opening a video input for the decoder: fsspec URLs and members of tar shards, with retries.

Local paths never come here (the decoder opens them itself). For everything else:

* **One file system per process**: :func:`filesystem` keeps one fsspec instance per
  (protocol, storage options) and process, so a worker does not rebuild an S3 client (its
  connection pool, credentials) per video. Storage options come from fsspec's own config
  (``FSSPEC_S3_ENDPOINT_URL=...`` environment variables) or the library's (``AWS_*``).
* **Tar members** (``tar://member::path-or-URL-of-shard.tar``, what webdataset /
  video2dataset write): the shard's member index (name -> data offset and size) is read
  once per tar and process, in one sequential pass over its headers, and cached; opening a
  member is then a seek, not a new index (fsspec's ``tar://`` rebuilt it on every open:
  6 / 45 / 224 ms per open for 100 / 1,000 / 5,000 members, see ``bench/decode.py``).
* **Retries**: every open and read goes through :class:`RetryingFile`, which retries a
  *transient* error (connection reset, timeout, HTTP 5xx / 429 / throttling) with exponential
  backoff, reopening the file at the same offset. A missing file (404), a permission error
  or a corrupt file are not retried. Retries are counted per process
  (:func:`take_retries`), apart from decode failures; when they are exhausted the read
  raises :class:`FetchError` (the decoder's stage ``fetch``).
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import tarfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import FreezeframeError

__all__ = ["FetchError", "RetryPolicy", "RetryingFile", "filesystem", "is_transient", "open_input",
           "split_url", "take_retries", "tar_index"]


class FetchError(FreezeframeError):
    """Reading an input kept failing with transient errors after every retry."""

    def __init__(self, path: str, attempts: int, cause: BaseException) -> None:
        self.path, self.attempts = path, attempts
        super().__init__(f"{path}: still failing after {attempts} attempts "
                         f"({type(cause).__name__}: {cause})")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before try ``k`` (k >= 1) is
    ``min(max_s, base_s * 2**(k-1))`` seconds times a random factor in [0.5, 1] (jitter)."""

    attempts: int = 5
    base_s: float = 0.2
    max_s: float = 5.0

    def wait(self, k: int) -> float:
        return min(self.max_s, self.base_s * 2 ** (k - 1)) * (0.5 + 0.5 * random.random())


#: the policy of this process (tests shorten it)
POLICY = RetryPolicy()

_TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETRESET, errno.EAGAIN}
_TRANSIENT_NAMES = {"ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
                    "ServerDisconnectedError", "ClientPayloadError", "ClientConnectorError", "ClientOSError",
                    "ServerTimeoutError", "IncompleteRead", "ProtocolError", "RemoteDisconnected"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                    "ServiceUnavailable", "RequestLimitExceeded"}


def _status(e: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp ``status``, botocore ``response``), if any."""
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        v = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return v if isinstance(v, int) else None
    return None


def _classify(err: BaseException) -> bool | None:
    """True: transient; False: a definite answer (missing, refused, bad data); None: unknown."""
    status = _status(err)
    if status is not None:
        return status >= 500 or status == 429
    resp = getattr(err, "response", None)
    if isinstance(resp, dict) and resp.get("Error", {}).get("Code") in _TRANSIENT_CODES:
        return True
    if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in _TRANSIENT_NAMES:
        return True
    if isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
        return True
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return None


def is_transient(e: BaseException) -> bool:
    """Worth retrying: connection resets, timeouts, HTTP 5xx/429, throttling. Not: a missing
    file (404), a permission error, anything that says the data is bad.

    File-system libraries wrap the original error (fsspec's HTTP file system turns a 503
    into ``FileNotFoundError``), so the chain of causes is read from the original out: the
    first error that says something decides."""
    chain: list[BaseException] = []
    err: BaseException | None = e
    while err is not None and all(err is not c for c in chain):
        chain.append(err)
        err = err.__cause__ or err.__context__
    for err in reversed(chain):
        verdict = _classify(err)
        if verdict is not None:
            return verdict
    return False


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.n += 1


_RETRIES = _Counter()


def take_retries() -> int:
    """Retries made in this process since the last call (and reset the count)."""
    with _RETRIES.lock:
        n, _RETRIES.n = _RETRIES.n, 0
    return n


def retrying(fn: Callable[[], Any], what: str, policy: RetryPolicy | None = None) -> Any:
    """``fn()``, retried on transient errors (see :class:`RetryPolicy`); raises
    :class:`FetchError` once the tries are used up, any other error at once."""
    policy = policy or POLICY
    for k in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised if not transient
            if not is_transient(e):
                raise
            if k == policy.attempts:
                raise FetchError(what, k, e) from e
            _RETRIES.add()
            time.sleep(policy.wait(k))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- file systems
_FILESYSTEMS: dict[tuple[int, str, str], Any] = {}
_FS_LOCK = threading.Lock()


def filesystem(protocol: str, **storage_options: Any) -> Any:
    """The fsspec file system of ``protocol`` with ``storage_options`` for this process (one
    instance, created on first use; a forked child makes its own)."""
    import fsspec  # lazy: only remote inputs need it

    key = (os.getpid(), protocol, json.dumps(storage_options, sort_keys=True, default=str))
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = _FILESYSTEMS[key] = fsspec.filesystem(protocol, **storage_options)
        return fs


def split_url(url: str) -> tuple[str, str]:
    """``"s3://b/k.mp4"`` -> ``("s3", "b/k.mp4")`` in fsspec's form; a plain path -> ``("file", path)``."""
    import fsspec

    proto, sep, rest = url.partition("://")
    if not sep:
        return "file", url
    cls = fsspec.get_filesystem_class(proto)
    return proto, cls._strip_protocol(url)


class RetryingFile(io.RawIOBase):
    """A read-only, seekable view of ``[offset, offset + size)`` of a file of ``fs`` (the whole
    file when ``size`` is None) whose opens and reads are retried on transient errors: after
    one, the underlying file is closed and reopened at the same position."""

    def __init__(self, fs: Any, path: str, *, offset: int = 0, size: int | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        self.fs, self.path, self.offset = fs, path, offset
        self.name = name or path
        self._f: Any = None
        self.pos = 0
        retrying(self._ensure, self.name)
        if size is None:
            size = retrying(lambda: self.fs.size(self.path), self.name) - offset
        self.size = int(size)

    def _ensure(self) -> Any:
        if self._f is None:
            self._f = self.fs.open(self.path, "rb")
        return self._f

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - a broken connection may not close cleanly
                pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""

        def once() -> bytes:
            try:
                f = self._ensure()
                if f.tell() != self.offset + self.pos:
                    f.seek(self.offset + self.pos)
                return f.read(n)
            except BaseException:
                self._drop()
                raise

        data = retrying(once, self.name)
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


# --------------------------------------------------------------------------- tar shards
_TAR_INDEX: OrderedDict[tuple[int, str], dict[str, tuple[int, int]]] = OrderedDict()
_TAR_CACHE = 64  # shards whose index a process keeps (a few MB for 64 x 5,000 members)


def _open_file(url: str) -> tuple[Any, str]:
    """(file system, path inside it) of a plain (unchained) URL or local path."""
    proto, path = split_url(url)
    return filesystem(proto), path


def tar_index(tar_url: str) -> dict[str, tuple[int, int]]:
    """``member name -> (data offset, size)`` of the tar at ``tar_url`` (local path or URL),
    read once per process in one pass over the headers, then cached (LRU of 64 shards)."""
    key = (os.getpid(), tar_url)
    index = _TAR_INDEX.get(key)
    if index is not None:
        _TAR_INDEX.move_to_end(key)
        return index
    fs, path = _open_file(tar_url)
    index = {}
    with RetryingFile(fs, path, name=tar_url) as raw, \
            tarfile.open(fileobj=io.BufferedReader(raw, 4096), mode="r:") as tf:  # headers only: small reads
        for info in tf:
            if info.isreg():
                index[info.name] = (info.offset_data, info.size)
                if info.name.startswith("./"):
                    index.setdefault(info.name[2:], (info.offset_data, info.size))
    _TAR_INDEX[key] = index
    while len(_TAR_INDEX) > _TAR_CACHE:
        _TAR_INDEX.popitem(last=False)
    return index


def open_input(url: str) -> io.BufferedReader:
    """A buffered, seekable, retrying binary file for ``url``: ``proto://path``, or a member
    of a tar shard ``tar://member::<tar path or URL>``.

    Raises:
        FileNotFoundError: no such file, or no such member in the tar.
        FetchError: transient errors persisted through every retry.
    """
    parts = url.split("::")
    if len(parts) == 1:
        fs, path = _open_file(url)
        return io.BufferedReader(RetryingFile(fs, path, name=url), 1 << 16)
    if len(parts) == 2 and parts[0].startswith("tar://"):
        member, outer = parts[0][len("tar://"):], parts[1]
        if outer.startswith("file://"):
            outer = outer[len("file://"):]
        index = tar_index(outer)
        if member not in index:
            raise FileNotFoundError(errno.ENOENT, f"no member {member!r} in the tar shard", outer)
        offset, size = index[member]
        fs, path = _open_file(outer)
        return io.BufferedReader(RetryingFile(fs, path, offset=offset, size=size, name=url), 1 << 16)
    # other chains (zip://, simplecache::...): fsspec's own machinery, still retried
    import fsspec

    of = retrying(lambda: fsspec.open(url, "rb").open(), url)
    return of
