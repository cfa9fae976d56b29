"""Decoders a decode worker can run, by name (``ExtractConfig.decoder``).

A decoder is a small picklable object (it is sent to the spawned decode workers) with one
method, ``iter_frames(path, *, geometry, fps, start, end, chunk_size, threads, min_frames,
max_gap) -> Iterator[FrameChunk]``, under the contract of :func:`extract.decode.iter_frames`:
frames ``(n, S, S, 3)`` uint8 RGB chosen by presentation time, timestamps ``(n,)`` float64
seconds on the stream's timeline, :class:`~extract.decode.DecodeError` with its stage.

* ``pyav`` (default): :func:`extract.decode.iter_frames`, CPU.
* ``torchcodec-cuda`` / ``torchcodec-cpu``: :class:`extract.decode_torchcodec.TorchCodecDecoder`
  (NVDEC on a GPU; optional dependency ``pip install 'freezeframe[gpu-decode]'``).

Benchmarks may register their own (``bench/decode.py``'s CPU-free stand-in).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from extract.decode import FrameChunk, iter_frames
from extract.decode_torchcodec import TorchCodecDecoder
from pipeline.registry import Registry

__all__ = ["DECODERS", "Decoder", "PyAVDecoder", "make_decoder"]


class Decoder(Protocol):
    def iter_frames(self, path: str | os.PathLike, **kwargs: Any) -> Iterator[FrameChunk]: ...


#: ``name -> factory() -> Decoder``
DECODERS: Registry[Callable[[], Decoder]] = Registry("decoder")


@DECODERS.register("pyav")
@dataclass(frozen=True)
class PyAVDecoder:
    """The CPU decoder: :func:`extract.decode.iter_frames` (PyAV / FFmpeg)."""

    def iter_frames(self, path: str | os.PathLike, **kwargs: Any) -> Iterator[FrameChunk]:
        return iter_frames(path, **kwargs)


DECODERS.add("torchcodec-cuda", lambda: TorchCodecDecoder("cuda"))
DECODERS.add("torchcodec-cpu", lambda: TorchCodecDecoder("cpu"))


def make_decoder(name: str) -> Decoder:
    """The decoder registered as ``name`` (:class:`~pipeline.registry.RegistryError` if unknown;
    an optional library that is missing is reported here, before any worker starts)."""
    decoder = DECODERS.get(name)()
    check = getattr(decoder, "check", None)
    if check is not None:
        check()
    return decoder
