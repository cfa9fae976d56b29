"""Label-map PNGs: the DAVIS / VIP annotation and results format.

DAVIS annotations and results are *palette* ("P" mode) PNGs: the pixel value is the
object id (0 = background, 255 = void) and the palette is the PASCAL VOC colour map, so
the file both displays in colour and reads back as ids. VIP part labels are plain 8-bit
grey PNGs holding class ids. :func:`read_label_png` returns the ids of either kind;
:func:`write_label_png` writes palette PNGs (atomically) that the official evaluation and
the DAVIS benchmark server accept.

Layout: label maps are ``(H, W)`` uint8 arrays of ids.
"""
from __future__ import annotations

import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import FreezeframeError
from pipeline.fileio import atomic_write_bytes

__all__ = ["LabelFileError", "voc_palette", "read_label_png", "write_label_png", "encode_label_png"]


class LabelFileError(FreezeframeError):
    """A label PNG is missing, unreadable or not a map of ids."""


@lru_cache(maxsize=1)
def voc_palette() -> tuple[int, ...]:
    """The PASCAL VOC colour map (256 RGB triples, flattened), used by DAVIS: id 1 is
    dark red ``(128, 0, 0)``, id 2 green ``(0, 128, 0)``, ..., 255 ``(224, 224, 192)``."""
    out: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return tuple(out)


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` uint8 ids of a palette ("P") or grey ("L") PNG.

    Raises:
        LabelFileError: the file is missing, unreadable, or an RGB image (colours are not
            ids: save results as palette PNGs).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("P", "L"):
                raise LabelFileError(
                    f"{path}: a {im.mode} image is not a label map; write palette (P) or grey (L) PNGs of ids"
                )
            return np.array(im, dtype=np.uint8)
    except FileNotFoundError:
        raise LabelFileError(f"missing label file {str(path)!r}") from None
    except OSError as e:
        raise LabelFileError(f"{path}: unreadable label PNG ({e})") from None


def encode_label_png(labels: np.ndarray) -> bytes:
    """PNG bytes of a palette image of ids ``(H, W)`` (values 0..255) with the VOC palette."""
    a = np.asarray(labels)
    if a.ndim != 2:
        raise ValueError(f"a label map is (H, W), got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"label ids must lie in [0, 255], got range [{a.min()}, {a.max()}]")
    im = Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))  # mode L: the ids
    im.putpalette(list(voc_palette()))  # L -> P with the ids as palette indices
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_label_png(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write ids ``(H, W)`` as a palette PNG at ``path`` (atomically; folders created)."""
    return atomic_write_bytes(path, encode_label_png(labels))
