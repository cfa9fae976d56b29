"""Which optional library an fsspec URL needs, checked before any work.

fsspec finds the implementation of ``s3://`` in s3fs, of ``gs://`` in gcsfs, ... and only
says so with an ImportError when a file is first opened. :func:`require_fs_library` asks for
every protocol of a (possibly chained, ``tar://m::s3://b/x.tar``) URL up front and raises
one :class:`MissingLibraryError` line with the install command.
"""
from __future__ import annotations

from typing import Iterable

from pipeline.errors import FreezeframeError
from pipeline.store.fs import OPTIONAL_FS, require_protocol

__all__ = ["MissingLibraryError", "PACKAGES", "require_fs_library", "require_fs_libraries", "url_protocols"]

#: protocol -> (package, ``pip install`` argument): the stores' table plus what inputs also use.
PACKAGES: dict[str, tuple[str, str]] = {**OPTIONAL_FS, "http": ("aiohttp", "aiohttp"), "https": ("aiohttp", "aiohttp"),
                                        "hf": ("huggingface_hub", "huggingface_hub")}


class MissingLibraryError(FreezeframeError):
    """A URL needs an optional library that is not installed (the message has the pip command)."""


def url_protocols(url: str) -> list[str]:
    """Protocols of a URL, outermost first: ``"tar://m.mp4::s3://b/x.tar"`` -> ``["tar", "s3"]``;
    a local path is ``["file"]``."""
    out = []
    for part in str(url).split("::"):
        proto, sep, _ = part.partition("://")
        out.append(proto.lower() if sep and proto else "file")
    return out


def require_fs_library(url: str) -> None:
    """Raise :class:`MissingLibraryError` if a protocol of ``url`` needs a library that is not
    installed, or a :class:`~pipeline.errors.StoreError` if fsspec does not know the protocol."""
    for proto in url_protocols(url):
        if proto != "file":
            require_protocol(proto, url, what="URLs", packages=PACKAGES, missing=MissingLibraryError)


def require_fs_libraries(urls: Iterable[str]) -> None:
    """:func:`require_fs_library` once per distinct protocol chain of ``urls`` (a manifest's paths)."""
    seen: set[tuple[str, ...]] = set()
    for url in urls:
        key = tuple(url_protocols(url))
        if key != ("file",) and key not in seen:
            seen.add(key)
            require_fs_library(url)
