"""Read a shard set back (local folder or fsspec URL): the manifest, and the samples of each shard in order.

Used by verify and preview; the trainer's streaming loader (trainer/data.py) reads the same format through
webdataset. Members are grouped by key the way webdataset does: key = member name up to the first dot of its
base name (keys never contain dots, see pipeline.schema)."""
from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Iterator

from pipeline.schema import MANIFEST
from pipeline.store import Store

__all__ = ["load_manifest", "iter_samples", "split_member"]


def load_manifest(store: Store) -> dict:
    if not store.exists(MANIFEST):
        raise SystemExit(f"error: {store.url}/{MANIFEST} not found: not a complete shard set "
                         f"(an interrupted job: re-run it; --part jobs: run python -m pipeline.merge {store.url})")
    return store.read_json(MANIFEST)


def split_member(name: str) -> tuple[str, str]:
    """'a%2Fb.dwt.f16' -> ('a%2Fb', 'dwt.f16')."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def iter_samples(data: bytes) -> Iterator[dict]:
    """Samples of one tar (as bytes): dicts {'__key__': key, ext: bytes, ...}, in tar order."""
    current: dict | None = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
