"""Read a shard set back (local folder or fsspec URL): the manifest, and the samples of each shard in order.

Used by verify and preview; the trainer's streaming loader reads the same format through webdataset. Members are
grouped by key the way webdataset does (`group_by_key`, shared with the trainer's stream): key = member name up to
the first dot of its base name (keys never contain dots, see pipeline.schema)."""
from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Iterable, Iterator

from pipeline.credentials import credentials_guard
from pipeline.schema import MANIFEST
from pipeline.sources import IMAGE_EXTS
from pipeline.store import Store

__all__ = ["load_manifest", "missing_manifest", "iter_samples", "group_by_key", "split_member", "sha256"]


def load_manifest(store: Store) -> dict:
    """The set's manifest.json; without one, SystemExit saying what the folder is instead and the fix. Refused
    bucket credentials end the command with `pipeline.credentials`'s message."""
    with credentials_guard(store.url):
        if not store.exists(MANIFEST):
            raise SystemExit(f"error: {store.url}/{MANIFEST} not found: {missing_manifest(store)}")
        return store.read_json(MANIFEST)


def missing_manifest(store: Store) -> str:
    """What a folder or prefix without manifest.json holds, and what to do: no such path / a folder of images /
    tars without a manifest (an interrupted shard job). One listing (two more at most, to find images one or two
    folder levels down, as in `ID/IMAGE.jpg` trees); called only on the error path."""
    url, entries = store.url, _listing(store, store.root)
    if entries is None:
        where = "no such folder" if store.local else "nothing under this bucket prefix (no such bucket or prefix)"
        return f"{url}: {where}; a shard set is what `python -m pipeline.shard ... --out DIR` writes"
    if len(entries) == 1 and entries[0].get("type") == "file" and _name(entries[0]) == _name({"name": store.root}):
        return (f"{url} is a file, not a shard set (a folder holding {MANIFEST} and NAME-000000.tar ...); the trainer "
                f"also reads a single .tar or a brace pattern DIR/NAME-{{000000..000009}}.tar without a manifest")
    names = [_name(e) for e in entries]
    tars = [n for n in names if n.endswith(".tar")]
    if tars or ".state" in names:
        return (f"{url} holds {len(tars)} .tar files but no {MANIFEST}: an interrupted `python -m pipeline.shard` "
                f"job (the manifest is written last). Re-run the same command: complete shards are kept. For --part "
                f"jobs, once every part has finished: `python -m pipeline.merge {url}`")
    for depth in range(3):
        if any(n.lower().endswith(IMAGE_EXTS) for n in names):
            return (f"{url} is a folder of images, not a shard set. Make one first: `python -m pipeline.shard "
                    f"folder --src {url} --out SHARDS`, then use SHARDS")
        folders = sorted(e["name"] for e in entries if e.get("type") == "directory")
        if depth == 2 or not folders or not (entries := _listing(store, folders[0])):
            break
        names = [_name(e) for e in entries]
    return f"{url} holds no {MANIFEST}, .tar shards or images: not a shard set"


def _listing(store: Store, path: str) -> list[dict] | None:
    """fs.ls entries of `path` ([] for an empty folder), None if there is no such folder or prefix."""
    try:
        return store.fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _name(entry: dict) -> str:
    return entry["name"].rstrip("/").rsplit("/", 1)[-1]


def split_member(name: str) -> tuple[str, str]:
    """'a%2Fb.dwt.f16' -> ('a%2Fb', 'dwt.f16')."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def group_by_key(members: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """(member name, bytes) pairs in tar order -> samples {'__key__': key, ext: bytes, ...}: consecutive members
    with the same key (`split_member`) make one sample, as the pipeline writes a sample's members together."""
    current: dict | None = None
    for name, data in members:
        key, ext = split_member(name)
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current


def iter_samples(data: bytes) -> Iterator[dict]:
    """Samples of one tar (as bytes): dicts {'__key__': key, ext: bytes, ...}, in tar order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        yield from group_by_key((m.name, tar.extractfile(m).read()) for m in tar if m.isfile())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
