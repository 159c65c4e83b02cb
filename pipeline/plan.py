"""The shard plan: what a `pipeline.shard` config makes, and which of it is already done.

A job is a pure function of (inputs, flags, versions):
1. list the corpus (sorted, unique keys; unusable rows and duplicate keys are recorded as skipped);
2. optionally keep a deterministic subset (ranked by sha256(seed, key) of the image or of its identity);
3. order the items by sha256("maskdm-shard-order", key), so every shard mixes identities, and cut them into
   shards of `shard_size` samples, each sorted by key; shard s belongs to --part I/P when s % P == I.

State lives beside the shards, under OUT/.state/: `plan.json` (the plan's digest, shard count, config, versions,
listing-time skips) and one record per finished shard, `NAME-000123.tar.json` (samples, bytes, sha256, skipped
inputs). A shard is complete when its record is present and the tar's size matches it; a rerun, or another
--part job, must have the same digest (same inputs, flags and versions) or it is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import PIL
import PIL.features

from pipeline.imaging import DEFAULT_BOX_SCALE, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, MAX_CROP_SIDE
from pipeline.schema import shard_name
from pipeline.sources import Item, Listing, celebahq_items, folder_items, vggface2_items
from pipeline.store import Store

STATE = ".state"
PLAN = f"{STATE}/plan.json"
CORPORA = ("folder", "vggface2", "celebahq")

__all__ = ["STATE", "PLAN", "CORPORA", "ShardConfig", "list_corpus", "select_subset", "plan_shards",
           "owned_shards", "environment", "code_version", "plan_digest", "check_plan", "write_plan",
           "planned_names", "complete", "write_record", "clean_stale_tmp"]


# --- the config ------------------------------------------------------------------------------------------------

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
        if self.size % 2 or not 8 <= self.size <= MAX_CROP_SIDE:
            raise ValueError(f"--size {self.size}: must be an even number in [8, {MAX_CROP_SIDE}]")
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


# --- listing -> shards -----------------------------------------------------------------------------------------

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


def plan_shards(cfg: ShardConfig) -> tuple[list[list[Item]], Listing]:
    """The shards (lists of items, each sorted by key) this config makes, and the listing they came from."""
    listing = list_corpus(cfg)
    items = select_subset(listing.items, cfg)
    items = sorted(items, key=lambda it: _rank("maskdm-shard-order", it.key))  # mix identities across shards
    if cfg.limit is not None:
        items = items[: cfg.limit]
    shards = [sorted(items[i:i + cfg.shard_size], key=lambda it: it.key)
              for i in range(0, len(items), cfg.shard_size)]
    return shards, listing


def owned_shards(cfg: ShardConfig, n: int) -> list[int]:
    """The indices of the `n` shards that this job's --part I/P writes: s % P == I."""
    i, p = cfg.part
    return [s for s in range(n) if s % p == i]


# --- the plan digest -------------------------------------------------------------------------------------------

def code_version() -> str:
    try:
        return f"maskdm {version('maskdm')}"
    except PackageNotFoundError:
        return "maskdm (not installed)"


def environment() -> dict:
    """Versions that shape the bytes written (JPEG encoder, numpy rounding, this code). Recorded in the plan and
    the manifest, and part of the plan digest: a rerun or a --part job with other versions is refused rather than
    mixing shards made differently."""
    return {"code": code_version(), "pillow": PIL.__version__, "numpy": np.__version__,
            "libjpeg_turbo": str(PIL.features.version("libjpeg_turbo"))}


def plan_digest(cfg: ShardConfig, shards: list[list[Item]]) -> str:
    h = hashlib.sha256(json.dumps([cfg.recorded(), environment()], sort_keys=True).encode())
    for s in shards:
        h.update(("\n".join(it.key for it in s) + "\0").encode())
    return h.hexdigest()


# --- OUT/.state ------------------------------------------------------------------------------------------------

def check_plan(store: Store, cfg: ShardConfig, digest: str) -> None:
    """Refuse to write into OUT when it holds a plan with another digest (other inputs, flags or versions)."""
    if not store.exists(PLAN):
        return
    old = store.read_json(PLAN)
    if old.get("digest") != digest:
        raise SystemExit(f"error: {cfg.out} already holds a shard set made from other inputs, flags or software "
                         f"versions ({old.get('shards')} shards, config {json.dumps(old.get('config'))}, "
                         f"environment {json.dumps(old.get('environment'))}; now {json.dumps(environment())}). "
                         f"Write to a new --out, or delete {cfg.out} to start over.")


def write_plan(store: Store, cfg: ShardConfig, digest: str, shards: list[list[Item]], listing: Listing) -> None:
    """OUT/.state/plan.json: what `pipeline.manifest` needs besides the shard records."""
    store.write_json(PLAN, {"digest": digest, "shards": len(shards), "config": cfg.recorded(),
                            "environment": environment(), "listing_skipped": listing.skipped,
                            "notes": listing.notes})


def planned_names(plan: dict) -> list[str]:
    """The shard file names of a plan read from plan.json, in index order."""
    return [shard_name(plan["config"]["name"], s) for s in range(plan["shards"])]


def _record_path(name: str) -> str:
    return f"{STATE}/{name}.json"


def complete(store: Store, name: str) -> dict | None:
    """The shard's record if the shard is complete (record present and the tar's size matches), else None."""
    try:
        record = store.read_json(_record_path(name))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if store.size(name) == record.get("bytes") else None


def write_record(store: Store, record: dict) -> None:
    """Mark shard record["name"] finished (after the tar itself is published)."""
    store.write_json(_record_path(record["name"]), record)


def clean_stale_tmp(store: Store, cfg: ShardConfig, todo: list[int]) -> None:
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
