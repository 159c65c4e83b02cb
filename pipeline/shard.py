"""Shard a corpus into WebDataset tars of face crops + Haar DWT (format v1, docs/format.md).

    python -m pipeline.shard folder   --src DIR  --out OUT
    python -m pipeline.shard vggface2 --src ROOT --out OUT [--split train|test] [--bbox CSV] [--box-scale 1.3]
    python -m pipeline.shard celebahq --src ROOT --out OUT [--split train|val|test|all]

OUT is a local folder or an fsspec URL (s3://bucket/prefix). The job is a pure function of (inputs, flags):
1. list the corpus (sorted, unique keys; unusable CSV rows and duplicate keys are recorded as skipped);
2. optionally keep a deterministic subset (--fraction/--count, --seed, --subset-by image|identity);
3. order the items by a keyed hash (so every shard mixes identities) and cut them into shards of --shard-size
   samples; shard i is then written by whichever process or --part owns it, its members in sorted key order;
4. each shard is built under a temporary name and renamed/uploaded when complete, then a small record of it
   (samples, bytes, sha256, skipped inputs) is written to OUT/.state/; shards with a record are skipped on re-run;
5. once every shard has its record, manifest.json is written (last). `python -m pipeline.merge OUT` does step 5
   alone, for --part jobs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import PIL
import PIL.features
from tqdm.auto import tqdm

from pipeline.credentials import credentials_guard
from pipeline.imaging import DEFAULT_BOX_SCALE, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, BadInput, process_image
from pipeline.schema import FORMAT_VERSION, MANIFEST, shard_name
from pipeline.sources import Item, Listing, celebahq_items, folder_items, vggface2_items
from pipeline.store import Store

STATE = ".state"
PLAN = f"{STATE}/plan.json"
CORPORA = ("folder", "vggface2", "celebahq")
BYTES_PER_SAMPLE_ESTIMATE = {True: 415_000, False: 22_000}  # 256 px, with / without dwt.f16 (docs/format.md)

__all__ = ["ShardConfig", "plan", "run", "main", "write_manifest"]


@dataclass(frozen=True)
class ShardConfig:
    corpus: str
    src: str
    out: str
    name: str = "shard"
    split: str = ""
    bbox: str | None = None
    size: int = 256
    dwt: bool = True
    box_scale: float = DEFAULT_BOX_SCALE
    min_side: int = DEFAULT_MIN_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size: int = 1000                 # samples per shard
    fraction: float | None = None
    count: int | None = None
    seed: int = 0
    subset_by: str = "image"
    limit: int | None = None
    no_bbox: bool = False
    # how the job runs, not what it makes: left out of the manifest (the output is the same whatever they are)
    workers: int = field(default=1, compare=False)
    part: tuple[int, int] = field(default=(0, 1), compare=False)
    strict: bool = field(default=False, compare=False)
    tmp_dir: str | None = field(default=None, compare=False)

    def __post_init__(self):
        # record equivalent spellings alike: an absolute source path, the corpus' default split
        if "://" not in self.src:
            object.__setattr__(self, "src", str(Path(self.src).resolve()))
        if not self.split:
            object.__setattr__(self, "split", {"vggface2": "train", "celebahq": "all"}.get(self.corpus, ""))
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; choose one of {CORPORA}")
        if self.size % 2 or self.size < 8:
            raise ValueError(f"--size {self.size}: must be an even number >= 8")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction {self.fraction}: must be in (0, 1]")
        if self.fraction is not None and self.count is not None:
            raise ValueError("--fraction and --count are exclusive: give one")
        if self.subset_by not in ("image", "identity"):
            raise ValueError(f"--subset-by {self.subset_by!r}: choose image or identity")
        if self.shard_size < 1 or self.workers < 1:
            raise ValueError("--shard-size and --workers must be >= 1")
        for flag, v in (("--count", self.count), ("--limit", self.limit)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} {v}: must be >= 1")
        i, p = self.part
        if not 0 <= i < p:
            raise ValueError(f"--part {i}/{p}: need 0 <= I < P")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits, '_', '.', '+' or '-'")

    def recorded(self) -> dict:
        """What the manifest records: every field that shapes the output (not workers/part/strict)."""
        d = asdict(self)
        for k in ("workers", "part", "strict", "out", "tmp_dir"):
            d.pop(k)
        return d


# --- planning --------------------------------------------------------------------------------------------------

def _rank(seed, text: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{text}".encode()).digest()


def list_corpus(cfg: ShardConfig) -> Listing:
    if cfg.corpus == "folder":
        return folder_items(cfg.src)
    if cfg.corpus == "vggface2":
        return vggface2_items(cfg.src, cfg.split, cfg.bbox, allow_no_boxes=cfg.no_bbox)
    return celebahq_items(cfg.src, cfg.split)


def select_subset(items: list[Item], cfg: ShardConfig) -> list[Item]:
    """Deterministic subset: rank images (or identities) by sha256(seed, key) and keep the first
    round(fraction * n) (at least 1) or `count`. By identity, whole identities are kept or dropped."""
    if cfg.fraction is None and cfg.count is None:
        return items
    if cfg.subset_by == "identity":
        groups = sorted({it.group or "" for it in items}, key=lambda g: _rank(cfg.seed, g))
        k = cfg.count if cfg.count is not None else max(1, round(cfg.fraction * len(groups)))
        keep = set(groups[:k])
        return [it for it in items if (it.group or "") in keep]
    ranked = sorted(items, key=lambda it: _rank(cfg.seed, it.key))
    k = cfg.count if cfg.count is not None else max(1, round(cfg.fraction * len(items)))
    return sorted(ranked[:k], key=lambda it: it.key)


def plan(cfg: ShardConfig) -> tuple[list[list[Item]], Listing]:
    """The shards (lists of items, each sorted by key) this config makes, and the listing they came from."""
    listing = list_corpus(cfg)
    items = select_subset(listing.items, cfg)
    items = sorted(items, key=lambda it: _rank("maskdm-shard-order", it.key))  # mix identities across shards
    if cfg.limit is not None:
        items = items[: cfg.limit]
    shards = [sorted(items[i:i + cfg.shard_size], key=lambda it: it.key)
              for i in range(0, len(items), cfg.shard_size)]
    return shards, listing


def environment() -> dict:
    """Versions that shape the bytes written (JPEG encoder, numpy rounding, this code). Recorded in the plan and
    the manifest, and part of the plan digest: a rerun or a --part job with other versions is refused rather than
    mixing shards made differently."""
    return {"code": _code_version(), "pillow": PIL.__version__, "numpy": np.__version__,
            "libjpeg_turbo": str(PIL.features.version("libjpeg_turbo"))}


def plan_digest(cfg: ShardConfig, shards: list[list[Item]]) -> str:
    h = hashlib.sha256(json.dumps([cfg.recorded(), environment()], sort_keys=True).encode())
    for s in shards:
        h.update(("\n".join(it.key for it in s) + "\0").encode())
    return h.hexdigest()


# --- writing one shard (runs in worker processes) ---------------------------------------------------------------

def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
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


def _sample_members(item: Item, cfg: ShardConfig) -> list[tuple[str, bytes]]:
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


class StrictStop(Exception):
    """--strict met a bad input (an Exception, not SystemExit, so that it crosses the worker pool)."""


def write_shard(cfg: ShardConfig, index: int, items: list[Item]) -> dict:
    """Build shard `index` under a temporary name, publish it, then its record in .state/. Returns the record."""
    store = Store(cfg.out)
    name = shard_name(cfg.name, index)
    skipped, samples, fallback = [], 0, 0
    tmp = store.tmp_file(name, cfg.tmp_dir)
    try:
        with open(tmp, "wb") as raw:
            f = _HashingWriter(raw)
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for item in items:
                    try:
                        members = _sample_members(item, cfg)
                    except Exception as e:  # noqa: BLE001 - one bad input must never end the job
                        bad = e if isinstance(e, BadInput) else BadInput("unexpected error", f"{type(e).__name__}: {e}")
                        if cfg.strict:
                            msg = f"error: {item.path}: {bad} (--strict stops at the first bad input)"
                            raise StrictStop(msg) from e
                        skipped.append({"input": item.rel, "reason": bad.reason, "detail": bad.detail[:200]})
                        continue
                    for member, data in members:
                        _tar_add(tar, member, data)
                    samples += 1
                    fallback += item.box_missing
            raw.flush()
            os.fsync(raw.fileno())  # on disk before it becomes visible under its final name
        digest, nbytes = f.sha256.hexdigest(), f.bytes
        store.publish(tmp, name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    record = {"name": name, "samples": samples, "bytes": nbytes, "sha256": digest, "inputs": len(items),
              "skipped": skipped, "box_fallback": fallback}
    store.write_json(f"{STATE}/{name}.json", record)
    return record


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


def _write_shard_task(args):
    return write_shard(*args)


def _write_shards(tasks: list, workers: int):
    """Records of the written shards, in completion order; one process per worker ("spawn": no inherited
    state, the same on every platform)."""
    if workers == 1 or len(tasks) <= 1:
        yield from map(_write_shard_task, tasks)
        return
    with mp.get_context("spawn").Pool(min(workers, len(tasks)), initializer=_die_with_parent) as pool:
        yield from pool.imap_unordered(_write_shard_task, tasks)


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the job's main process dies (killed jobs leave no writers behind)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --- the job ---------------------------------------------------------------------------------------------------

def _complete(store: Store, name: str) -> dict | None:
    """The shard's record if the shard is complete (record present and the tar's size matches), else None."""
    try:
        record = store.read_json(f"{STATE}/{name}.json")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if store.size(name) == record.get("bytes") else None


def run(cfg: ShardConfig) -> dict | None:
    """Write this job's shards (all, or those of its --part) and, when every shard is complete, the manifest."""
    start = time.time()
    shards, listing = plan(cfg)
    if not shards:
        raise SystemExit(f"error: no input images found under {cfg.src} (after --fraction/--count/--limit)")
    store = Store(cfg.out)
    store.makedirs(STATE)
    digest = plan_digest(cfg, shards)
    _check_plan(store, cfg, digest, len(shards))
    store.write_json(PLAN, {"digest": digest, "shards": len(shards), "config": cfg.recorded(),
                            "environment": environment(), "listing_skipped": listing.skipped,
                            "notes": listing.notes})
    i, p = cfg.part
    mine = [s for s in range(len(shards)) if s % p == i]
    todo = [s for s in mine if _complete(store, shard_name(cfg.name, s)) is None]
    done_items = sum(len(shards[s]) for s in mine) - sum(len(shards[s]) for s in todo)
    _clean_stale_tmp(store, cfg, todo)
    print(f"{cfg.corpus}: {sum(map(len, shards))} inputs -> {len(shards)} shards; part {i}/{p} owns {len(mine)}, "
          f"{len(mine) - len(todo)} already complete", file=sys.stderr)
    bar = tqdm(total=sum(len(shards[s]) for s in mine), initial=done_items, unit="img", desc="sharding",
               dynamic_ncols=True, file=sys.stderr)
    skipped = 0
    try:
        for record in _write_shards([(cfg, s, shards[s]) for s in todo], cfg.workers):
            bar.update(record["inputs"])
            skipped += len(record["skipped"])
            bar.set_postfix(skipped=skipped)
    except StrictStop as e:
        raise SystemExit(str(e)) from None
    finally:
        bar.close()
    manifest = write_manifest(cfg.out)
    if manifest is None:
        print(f"part {i}/{p} done in {time.time() - start:.0f} s; other parts still running: "
              f"run `python -m pipeline.merge {cfg.out}` after the last one", file=sys.stderr)
    else:
        _print_summary(manifest, time.time() - start)
    return manifest


def _check_plan(store: Store, cfg: ShardConfig, digest: str, n: int) -> None:
    if not store.exists(PLAN):
        return
    old = store.read_json(PLAN)
    if old.get("digest") != digest:
        raise SystemExit(f"error: {cfg.out} already holds a shard set made from other inputs, flags or software "
                         f"versions ({old.get('shards')} shards, config {json.dumps(old.get('config'))}, "
                         f"environment {json.dumps(old.get('environment'))}; now {json.dumps(environment())}). "
                         f"Write to a new --out, or delete {cfg.out} to start over.")


def _clean_stale_tmp(store: Store, cfg: ShardConfig, todo: list[int]) -> None:
    """Remove temporary files left by a killed run, for the shards this job is about to write (never another
    part's): beside the shards (local output) or in the temporary folder (bucket output), and in .state/."""
    names = [shard_name(cfg.name, s) for s in todo]
    prefixes = tuple(f".tmp-{n}." for n in names) + tuple(f".tmp-{n}.json." for n in names)
    folders = [os.path.dirname(store.tmp_file_path(names[0], cfg.tmp_dir))] if names else []
    if store.local:
        folders.append(store.path(STATE))
    for folder in folders:
        if os.path.isdir(folder):
            for entry in os.listdir(folder):
                if entry.startswith(prefixes):
                    os.unlink(os.path.join(folder, entry))


def write_manifest(out: str) -> dict | None:
    """Combine the shard records in OUT/.state into OUT/manifest.json, if every planned shard is complete."""
    with credentials_guard(out):  # also what `python -m pipeline.merge` runs
        return _write_manifest(out)


def _write_manifest(out: str) -> dict | None:
    store = Store(out)
    if not store.exists(PLAN):
        raise SystemExit(f"error: {out} has no {PLAN}: not a shard set in progress (run pipeline.shard first)")
    p = store.read_json(PLAN)
    name = p["config"]["name"]
    records = []
    for s in range(p["shards"]):
        record = _complete(store, shard_name(name, s))
        if record is None:
            return None
        records.append(record)
    skipped = sorted(p["listing_skipped"] + [x for r in records for x in r["skipped"]],
                     key=lambda x: (x["input"], x["reason"]))
    by_reason: dict[str, int] = {}
    for x in skipped:
        by_reason[x["reason"]] = by_reason.get(x["reason"], 0) + 1
    manifest = {
        "format_version": FORMAT_VERSION,
        "code_version": _code_version(),
        "environment": p["environment"],
        "config": p["config"],
        "source_notes": p["notes"],
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in records],
        "totals": {"shards": len(records), "samples": sum(r["samples"] for r in records),
                   "bytes": sum(r["bytes"] for r in records), "inputs": sum(r["inputs"] for r in records),
                   "skipped": len(skipped), "box_fallback": sum(r["box_fallback"] for r in records)},
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "skipped": skipped,
    }
    store.write_json(MANIFEST, manifest)
    return manifest


def _code_version() -> str:
    try:
        return f"maskdm {version('maskdm')}"
    except PackageNotFoundError:
        return "maskdm (not installed)"


def _print_summary(m: dict, seconds: float) -> None:
    t = m["totals"]
    rate = t["inputs"] / seconds if seconds > 0 else float("nan")
    print(f"read {t['inputs']} inputs, wrote {t['samples']} samples in {t['shards']} shards "
          f"({t['bytes'] / 1e6:.1f} MB), skipped {t['skipped']}, centre-square fallbacks {t['box_fallback']}; "
          f"{seconds:.1f} s, {rate:.0f} img/s", file=sys.stderr)
    for reason, n in m["skipped_by_reason"].items():
        print(f"  skipped {n:>6}  {reason}", file=sys.stderr)


# --- command line ----------------------------------------------------------------------------------------------

def _shard_size(text: str, dwt: bool, size: int) -> int:
    """'1000' (samples) or '500MB' / '1GB' (bytes, converted with the per-sample size estimate)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]B)?", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"--shard-size {text!r}: give samples (1000) or bytes (500MB, 1GB)")
    if not m.group(2):
        return int(float(m.group(1)))
    nbytes = float(m.group(1)) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]
    per_sample = BYTES_PER_SAMPLE_ESTIMATE[dwt] * (size / 256) ** 2
    return max(1, int(nbytes // per_sample))


def _part(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--part {text!r}: give I/P, e.g. 0/8 (I from 0 to P-1)")
    return int(m.group(1)), int(m.group(2))


def parse_args(argv=None) -> ShardConfig:
    p = argparse.ArgumentParser(prog="python -m pipeline.shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", choices=CORPORA)
    p.add_argument("--src", required=True, help="corpus root (local folder)")
    p.add_argument("--out", required=True, help="output folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--name", default="shard", help="shard file prefix: NAME-000000.tar (default: shard)")
    p.add_argument("--split", default="", help="vggface2: train|test (default train); celebahq: train|val|test|all")
    p.add_argument("--bbox", help="vggface2: loose box CSV (default: found under ROOT/bb_landmark, meta or data)")
    p.add_argument("--no-bbox", action="store_true", help="vggface2 without a box file: centre squares")
    p.add_argument("--box-scale", type=float, default=DEFAULT_BOX_SCALE,
                   help=f"crop side = box-scale x max(box w, h) (default {DEFAULT_BOX_SCALE})")
    p.add_argument("--size", type=int, default=256, help="crop side in pixels (default 256)")
    p.add_argument("--no-dwt", action="store_true", help="store only the JPEG (the trainer computes the DWT)")
    p.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE, help="skip crops smaller than this (px)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    p.add_argument("--shard-size", default="1000", help="samples per shard (1000) or bytes (500MB, 1GB)")
    p.add_argument("--fraction", type=float, help="keep this fraction of the images (or identities)")
    p.add_argument("--count", type=int, help="keep this many images (or identities)")
    p.add_argument("--subset-by", default="image", choices=["image", "identity"])
    p.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    p.add_argument("--limit", type=int, help="shard only the first N inputs of the plan (quick runs)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--part", type=_part, default=(0, 1), help="I/P: write only shards s with s %% P == I")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--tmp-dir", help="where shards are built before upload to a bucket (default: system temp)")
    a = p.parse_args(argv)
    try:
        return ShardConfig(corpus=a.corpus, src=a.src, out=a.out, name=a.name, split=a.split, bbox=a.bbox,
                           size=a.size, dwt=not a.no_dwt, box_scale=a.box_scale, min_side=a.min_side,
                           max_pixels=a.max_pixels, shard_size=_shard_size(a.shard_size, not a.no_dwt, a.size),
                           fraction=a.fraction, count=a.count, seed=a.seed, subset_by=a.subset_by, limit=a.limit,
                           no_bbox=a.no_bbox, workers=a.workers, part=a.part, strict=a.strict, tmp_dir=a.tmp_dir)
    except ValueError as e:
        p.error(str(e))


def main(argv=None) -> None:
    cfg = parse_args(argv)
    with credentials_guard(cfg.out):  # refused credentials: the bucket and what to set, no traceback
        run(cfg)


if __name__ == "__main__":
    main()
