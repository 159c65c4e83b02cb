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
import re
import sys
import time

from tqdm.auto import tqdm

from pipeline.credentials import credentials_guard
from pipeline.imaging import DEFAULT_BOX_SCALE, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from pipeline.manifest import write_manifest
from pipeline.plan import (CORPORA, STATE, ShardConfig, check_plan, clean_stale_tmp, complete, owned_shards,
                           plan_digest, plan_shards, write_plan)
from pipeline.schema import shard_name
from pipeline.store import Store
from pipeline.tarwriter import StrictStop, write_shards

BYTES_PER_SAMPLE_ESTIMATE = {True: 415_000, False: 22_000}  # 256 px, with / without dwt.f16 (docs/format.md)

__all__ = ["run", "parse_args", "main"]


# The library this command drives: pipeline.plan (config, listing -> shards, .state), pipeline.tarwriter (one
# shard's tar, the worker pool), pipeline.manifest (manifest.json).

# --- the job ---------------------------------------------------------------------------------------------------

def run(cfg: ShardConfig) -> dict | None:
    """Write this job's shards (all, or those of its --part) and, when every shard is complete, the manifest."""
    start = time.time()
    shards, listing = plan_shards(cfg)
    if not shards:
        raise SystemExit(f"error: no input images found under {cfg.src} (after --fraction/--count/--limit)")
    store = Store(cfg.out)
    store.makedirs(STATE)
    digest = plan_digest(cfg, shards)
    check_plan(store, cfg, digest)
    write_plan(store, cfg, digest, shards, listing)
    i, p = cfg.part
    mine = owned_shards(cfg, len(shards))
    todo = [s for s in mine if complete(store, shard_name(cfg.name, s)) is None]
    done_items = sum(len(shards[s]) for s in mine) - sum(len(shards[s]) for s in todo)
    clean_stale_tmp(store, cfg, todo)
    print(f"{cfg.corpus}: {sum(map(len, shards))} inputs -> {len(shards)} shards; part {i}/{p} owns {len(mine)}, "
          f"{len(mine) - len(todo)} already complete", file=sys.stderr)
    bar = tqdm(total=sum(len(shards[s]) for s in mine), initial=done_items, unit="img", desc="sharding",
               dynamic_ncols=True, file=sys.stderr)
    skipped = 0
    try:
        for record in write_shards(cfg, shards, todo):
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
