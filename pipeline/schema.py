"""Shard format v1: names, sample keys and member encodings shared by the pipeline and the trainer.

Full description: docs/format.md. A shard set is a folder or bucket prefix holding `NAME-%06d.tar` files and
`manifest.json`; every sample is a group of tar members sharing a key:

    KEY.jpg      256x256 RGB crop, JPEG quality 95, 4:4:4 chroma (no subsampling)
    KEY.dwt.f16  (optional) raw little-endian float16, shape (12, 128, 128): orthonormal one-level Haar DWT of the
                 uint8 crop scaled to [0, 1], channels [cA(R,G,B), cH(R,G,B), cV(R,G,B), cD(R,G,B)]
    KEY.json     source path, identity, original size, face box, crop box, resize scale, sha256 of the source
    KEY.cls      (optional) identity index as ASCII decimal

Keys: the source path relative to the corpus root, without its extension, percent-encoded so that webdataset
never splits it: "%" -> "%25", "." -> "%2E", "/" -> "%2F" (and any other character outside [A-Za-z0-9_-~+=,@()]
as its UTF-8 %XX bytes). "n000002/0001_01.jpg" -> "n000002%2F0001_01". `decode_key` reverses it.
"""
from __future__ import annotations

import re
from urllib.parse import quote, unquote

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JPEG_QUALITY = 95
DWT_DTYPE = np.dtype("<f2")
SHARD_PATTERN = re.compile(r"^(?P<name>.+)-(?P<index>\d{6})\.tar$")

__all__ = ["FORMAT_VERSION", "MANIFEST", "JPEG_QUALITY", "DWT_DTYPE", "shard_name", "encode_key", "decode_key",
           "dwt_shape", "decode_dwt", "encode_dwt"]


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def encode_key(relpath: str) -> str:
    """Source path relative to the corpus root (with or without extension) -> a webdataset-safe key."""
    stem = relpath.replace("\\", "/")
    base = stem.rsplit("/", 1)[-1]
    if "." in base:
        stem = stem[: len(stem) - len(base)] + base.rsplit(".", 1)[0]
    return quote(stem, safe="-_~+=,@()").replace(".", "%2E")


def decode_key(key: str) -> str:
    """Key -> the source path it came from, without its extension."""
    return unquote(key)


def dwt_shape(size: int) -> tuple[int, int, int]:
    return (12, size // 2, size // 2)


def encode_dwt(bands: np.ndarray) -> bytes:
    """(12, h, w) float array -> raw little-endian float16 bytes."""
    return np.ascontiguousarray(bands, dtype=DWT_DTYPE).tobytes()


def decode_dwt(data: bytes, size: int = 256) -> np.ndarray:
    """Raw `dwt.f16` bytes of a `size` px crop -> (12, size/2, size/2) float16 array (read-only view)."""
    shape = dwt_shape(size)
    expected = int(np.prod(shape)) * DWT_DTYPE.itemsize
    if len(data) != expected:
        raise ValueError(f"dwt.f16 member has {len(data)} bytes, expected {expected} for a {size} px crop")
    return np.frombuffer(data, dtype=DWT_DTYPE).reshape(shape)
