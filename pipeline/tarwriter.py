"""Writing one shard: its samples' members into a deterministic tar, published only once complete.

Determinism (docs/format.md, Determinism): the items of a shard come sorted by key (`pipeline.plan`); a sample's
members are written together in the order jpg, dwt.f16, json, cls; every member has mtime 0, uid/gid 0, empty
user/group names and mode 0644, in PAX format. So the same inputs and flags give the same bytes, whichever worker
or --part job writes the shard.

Visibility: the tar is built under a temporary name (beside the shard, or in --tmp-dir for a bucket), hashed as
it is written (no second read), fsync'ed, then renamed or uploaded (`Store.publish`); its record in OUT/.state/
comes last. Bad inputs are skipped and recorded in that record, or, with --strict, end the job (`StrictStop`).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import tarfile
from typing import Iterable, Iterator

from pipeline.imaging import BadInput, process_image
from pipeline.plan import ShardConfig, write_record
from pipeline.schema import shard_name
from pipeline.sources import Item
from pipeline.store import Store

__all__ = ["StrictStop", "add_member", "write_tar", "sample_members", "write_shard", "write_shards"]


class StrictStop(Exception):
    """--strict met a bad input (an Exception, not SystemExit, so that it crosses the worker pool)."""


# --- the tar ---------------------------------------------------------------------------------------------------

def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one regular file with fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644). The header
    comes from tarfile; the payload is written straight to the file, without tarfile's chunked copy."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tar.format, tar.encoding, tar.errors)
    pad = -len(data) % tarfile.BLOCKSIZE
    tar.fileobj.write(header)
    tar.fileobj.write(data)
    if pad:
        tar.fileobj.write(bytes(pad))
    tar.offset += len(header) + len(data) + pad
    tar.members.append(info)


class _HashingWriter:
    """A write-only file that hashes and counts what passes through (no second read of the shard)."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.bytes


def write_tar(store: Store, name: str, members: Iterable[tuple[str, bytes]], tmp_dir: str | None = None
              ) -> tuple[str, int]:
    """Write `members` (name, bytes), in the order given, as tar `name` of `store`; returns (sha256, bytes).
    Nothing is visible under `name` unless the whole tar was written: on any error (including one raised by the
    `members` iterator) the temporary file is removed and the error propagates."""
    tmp = store.tmp_file(name, tmp_dir)
    try:
        with open(tmp, "wb") as raw:
            f = _HashingWriter(raw)
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for member, data in members:
                    add_member(tar, member, data)
            raw.flush()
            os.fsync(raw.fileno())  # on disk before it becomes visible under its final name
        store.publish(tmp, name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return f.sha256.hexdigest(), f.bytes


# --- one shard -------------------------------------------------------------------------------------------------

def sample_members(item: Item, cfg: ShardConfig) -> list[tuple[str, bytes]]:
    """The tar members of one source image: KEY.jpg, KEY.dwt.f16 (unless --no-dwt), KEY.json, KEY.cls (if the
    corpus has identities). Raises BadInput for an unusable source."""
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadInput("unreadable file", str(e)) from None
    res = process_image(data, size=cfg.size, box=item.box, box_scale=cfg.box_scale, with_dwt=cfg.dwt,
                        min_side=cfg.min_side, max_pixels=cfg.max_pixels)
    meta = {"source": item.rel, "identity": item.identity, **res.meta, "box_fallback": item.box_missing}
    members = [(f"{item.key}.jpg", res.jpg)]
    if res.dwt is not None:
        members.append((f"{item.key}.dwt.f16", res.dwt))
    members.append((f"{item.key}.json", json.dumps(meta, sort_keys=True).encode()))
    if item.cls is not None:
        members.append((f"{item.key}.cls", str(item.cls).encode()))
    return members


def _sample_or_skip(item: Item, cfg: ShardConfig, skipped: list) -> list[tuple[str, bytes]] | None:
    """`sample_members`, or None after recording why the item was skipped (StrictStop under --strict)."""
    try:
        return sample_members(item, cfg)
    except Exception as e:  # noqa: BLE001 - one bad input must never end the job
        bad = e if isinstance(e, BadInput) else BadInput("unexpected error", f"{type(e).__name__}: {e}")
        if cfg.strict:
            raise StrictStop(f"error: {item.path}: {bad} (--strict stops at the first bad input)") from e
        skipped.append({"input": item.rel, "reason": bad.reason, "detail": bad.detail[:200]})
        return None


def _shard_members(cfg: ShardConfig, items: list[Item], record: dict) -> Iterator[tuple[str, bytes]]:
    """The members of every usable item, in item order; counts samples, skips and box fallbacks in `record`."""
    for item in items:
        members = _sample_or_skip(item, cfg, record["skipped"])
        if members is None:
            continue
        yield from members
        record["samples"] += 1
        record["box_fallback"] += item.box_missing


def write_shard(cfg: ShardConfig, index: int, items: list[Item]) -> dict:
    """Build shard `index` under a temporary name, publish it, then its record in .state/. Returns the record."""
    store = Store(cfg.out)
    name = shard_name(cfg.name, index)
    tally = {"samples": 0, "skipped": [], "box_fallback": 0}
    digest, nbytes = write_tar(store, name, _shard_members(cfg, items, tally), cfg.tmp_dir)
    record = {"name": name, "samples": tally["samples"], "bytes": nbytes, "sha256": digest, "inputs": len(items),
              "skipped": tally["skipped"], "box_fallback": tally["box_fallback"]}
    write_record(store, record)
    return record


# --- many shards (worker processes) ----------------------------------------------------------------------------

def _write_shard_task(args):
    return write_shard(*args)


def write_shards(cfg: ShardConfig, shards: list[list[Item]], todo: list[int]) -> Iterator[dict]:
    """Write shards[s] for s in `todo`; yields their records in completion order. With cfg.workers > 1, one
    process per worker ("spawn": no inherited state, the same on every platform)."""
    tasks = [(cfg, s, shards[s]) for s in todo]
    if cfg.workers == 1 or len(tasks) <= 1:
        yield from map(_write_shard_task, tasks)
        return
    with mp.get_context("spawn").Pool(min(cfg.workers, len(tasks)), initializer=_die_with_parent) as pool:
        yield from pool.imap_unordered(_write_shard_task, tasks)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the job's main process dies (killed jobs leave no writers behind)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
