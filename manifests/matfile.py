"""A small reader of MATLAB 5 / 7 MAT-files (the format of JHMDB's ``joint_positions.mat``).

Reads the top-level numeric arrays (double, single and integer classes; logical as
uint8) and character arrays (as ``str``) of a level-5 MAT-file, compressed (v7,
``miCOMPRESSED``) or not, in either byte order. Cells, structs, objects and sparse
matrices are skipped. MATLAB 7.3 files are HDF5 and are refused with a message.

Arrays come back in MATLAB's shape (column-major data reshaped with ``order="F"``), in the
dtype of their MATLAB class (MATLAB may store a double array's values as a smaller integer
type on disk; they are cast back).

Format reference: "MAT-File Format", MathWorks, level-5 data elements.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import FreezeframeError

__all__ = ["MatFileError", "read_mat"]

# data element types (miXXX)
_MI_DTYPES = {
    1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
    16: "u1", 17: "u2", 18: "u4",  # utf8 / utf16 / utf32 code units
}
_MI_MATRIX = 14
_MI_COMPRESSED = 15
# array classes (mxXXX_CLASS) -> numpy dtype; 4 = char
_MX_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_MX_CHAR = 4
_LOGICAL_FLAG = 0x0200
_COMPLEX_FLAG = 0x0800


class MatFileError(FreezeframeError):
    """A MAT-file cannot be read."""


def read_mat(path: str | os.PathLike) -> dict[str, np.ndarray | str]:
    """Top-level variables of a level-5 MAT-file: ``name -> ndarray`` (numeric) or ``str`` (char).

    Raises:
        MatFileError: missing file, MATLAB 7.3 (HDF5) file, or malformed content.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MatFileError(f"missing MAT-file {str(path)!r}") from None
    if data[:8] == b"\x89HDF\r\n\x1a\n" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        raise MatFileError(f"{path}: MATLAB 7.3 (HDF5) MAT-files are not supported; re-save with save(..., '-v7')")
    if len(data) < 128:
        raise MatFileError(f"{path}: too short for a MAT-file header")
    endian = data[126:128]
    if endian == b"IM":
        bo = "<"
    elif endian == b"MI":
        bo = ">"
    else:
        raise MatFileError(f"{path}: not a level-5 MAT-file (no endian indicator)")
    out: dict[str, np.ndarray | str] = {}
    try:
        _read_elements(data, 128, len(data), bo, out)
    except (struct.error, ValueError, zlib.error, IndexError) as e:
        raise MatFileError(f"{path}: malformed MAT-file ({e})") from None
    return out


def _tag(buf: bytes, pos: int, bo: str) -> tuple[int, int, int, int]:
    """``(type, nbytes, data_start, next_element)`` of the data element at ``pos``."""
    word0, word1 = struct.unpack_from(bo + "II", buf, pos)
    if word0 >> 16:  # small data element: type and size packed in the first word
        return word0 & 0xFFFF, word0 >> 16, pos + 4, pos + 8
    start = pos + 8
    end = start + word1
    if word0 != _MI_COMPRESSED:
        end += (-word1) % 8  # padded to 8 bytes
    return word0, word1, start, end


def _read_elements(buf: bytes, pos: int, stop: int, bo: str, out: dict) -> None:
    while pos + 8 <= stop:
        mtype, nbytes, start, nxt = _tag(buf, pos, bo)
        if mtype == _MI_COMPRESSED:
            inner = zlib.decompress(buf[start : start + nbytes])
            _read_elements(inner, 0, len(inner), bo, out)
        elif mtype == _MI_MATRIX and nbytes:
            item = _read_matrix(buf, start, start + nbytes, bo)
            if item is not None:
                out[item[0]] = item[1]
        pos = nxt


def _numeric(buf: bytes, start: int, nbytes: int, mtype: int, bo: str) -> np.ndarray:
    if mtype not in _MI_DTYPES:
        raise ValueError(f"unsupported data type {mtype}")
    dt = np.dtype(bo + _MI_DTYPES[mtype])
    return np.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize, offset=start)


def _read_matrix(buf: bytes, pos: int, stop: int, bo: str) -> tuple[str, np.ndarray | str] | None:
    subs = []
    while pos + 8 <= stop:
        mtype, nbytes, start, nxt = _tag(buf, pos, bo)
        subs.append((mtype, nbytes, start))
        pos = nxt
        if len(subs) == 5:
            break
    if len(subs) < 3:
        return None
    flags = _numeric(buf, subs[0][2], subs[0][1], subs[0][0], bo)
    mx_class = int(flags[0]) & 0xFF
    dims = tuple(int(d) for d in _numeric(buf, subs[1][2], subs[1][1], subs[1][0], bo))
    name = bytes(buf[subs[2][2] : subs[2][2] + subs[2][1]]).decode("ascii", "replace")
    if len(subs) < 4:
        return None
    mtype, nbytes, start = subs[3]
    if mx_class == _MX_CHAR:
        codes = _numeric(buf, start, nbytes, mtype, bo)
        chars = codes.reshape(dims, order="F") if codes.size == int(np.prod(dims)) else codes
        if mtype == 16:
            return name, bytes(codes.astype(np.uint8)).decode("utf-8", "replace")
        rows = np.atleast_2d(chars)
        return name, "\n".join("".join(map(chr, r)) for r in rows)
    if mx_class not in _MX_DTYPES:
        return None  # cell, struct, object, sparse: not needed here
    real = _numeric(buf, start, nbytes, mtype, bo)
    cls = np.dtype(_MX_DTYPES[mx_class])
    arr = real.astype(cls).reshape(dims, order="F")
    if int(flags[0]) & _COMPLEX_FLAG and len(subs) >= 5:
        imag = _numeric(buf, subs[4][2], subs[4][1], subs[4][0], bo).astype(cls).reshape(dims, order="F")
        arr = arr + 1j * imag
    if int(flags[0]) & _LOGICAL_FLAG:
        arr = arr.astype(bool)
    return name, arr
