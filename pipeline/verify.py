"""Check a shard set against its manifest, decoding every sample.

    python -m pipeline.verify OUT [--dwt-tol 0.2]

For every shard: present, size and sha256 as in the manifest, sample count as recorded; for every sample: a
256x256 (the set's --size) RGB JPEG, a parseable json, `cls` an integer, and, when the set has `dwt.f16`, its
shape and its values against the Haar DWT of the decoded JPEG. The DWT is computed from the uint8 crop before
JPEG encoding, so the two differ by the JPEG error: at quality 95, 4:4:4, a band coefficient (the sum of four
pixel errors / 2) stays within --dwt-tol (default 0.2, i.e. ~25 grey levels at worst; typical max 0.02-0.06) and
the mean absolute difference within --dwt-mean-tol (default 0.01). Exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import sys

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline.credentials import credentials_guard
from pipeline.imaging import haar_dwt_uint8
from pipeline.reader import iter_samples, load_manifest, sha256
from pipeline.schema import decode_dwt
from pipeline.store import Store

__all__ = ["verify", "main"]


def _check_sample(sample: dict, size: int, with_dwt: bool, tol: float, mean_tol: float) -> list[str]:
    key, errors = sample["__key__"], []
    if "jpg" not in sample or "json" not in sample:
        return [f"{key}: missing jpg or json member (has {sorted(k for k in sample if k != '__key__')})"]
    try:
        im = Image.open(io.BytesIO(sample["jpg"]))
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is a mismatch to report
        return [f"{key}: jpg does not decode: {e}"]
    if im.mode != "RGB" or im.size != (size, size):
        errors.append(f"{key}: jpg is {im.mode} {im.size[0]}x{im.size[1]}, expected RGB {size}x{size}")
    try:
        json.loads(sample["json"])
    except ValueError as e:
        errors.append(f"{key}: json does not parse: {e}")
    if "cls" in sample and not sample["cls"].strip().isdigit():
        errors.append(f"{key}: cls {sample['cls'][:20]!r} is not an integer")
    if with_dwt:
        if "dwt.f16" not in sample:
            errors.append(f"{key}: dwt.f16 missing")
        elif not errors:
            try:
                dwt = decode_dwt(sample["dwt.f16"], size).astype(np.float32)
            except ValueError as e:
                return errors + [f"{key}: {e}"]
            diff = np.abs(dwt - haar_dwt_uint8(np.asarray(im)))
            if not np.isfinite(dwt).all() or diff.max() > tol or diff.mean() > mean_tol:
                errors.append(f"{key}: dwt.f16 differs from the DWT of the jpg: max {diff.max():.4f} "
                              f"(tol {tol}), mean {diff.mean():.5f} (tol {mean_tol})")
    return errors


def _verify_shard(args) -> tuple[list[str], int]:
    out, entry, size, with_dwt, tol, mean_tol = args
    store, name, errors = Store(out), entry["name"], []
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        return [f"{name}: missing"], 0
    if len(data) != entry["bytes"]:
        errors.append(f"{name}: {len(data)} bytes, manifest says {entry['bytes']}")
    if sha256(data) != entry["sha256"]:
        errors.append(f"{name}: sha256 differs from the manifest")
    n = 0
    try:
        for sample in iter_samples(data):
            errors += _check_sample(sample, size, with_dwt, tol, mean_tol)
            n += 1
    except Exception as e:  # noqa: BLE001 - a tar that cannot be read to its end is a mismatch
        errors.append(f"{name}: unreadable after {n} samples: {e}")
    if n != entry["samples"]:
        errors.append(f"{name}: {n} samples, manifest says {entry['samples']}")
    return errors, n


def verify(out: str, tol: float = 0.2, mean_tol: float = 0.01, progress: bool = True, workers: int = 1) -> dict:
    """Returns {'shards', 'samples', 'errors': [...]}; errors empty means the set matches its manifest."""
    manifest = load_manifest(Store(out))
    cfg = manifest["config"]
    tasks = [(out, entry, cfg["size"], cfg["dwt"], tol, mean_tol) for entry in manifest["shards"]]
    errors, samples = [], 0
    bar = tqdm(total=manifest["totals"]["samples"], unit="sample", desc="verifying", disable=not progress,
               file=sys.stderr)
    if workers > 1 and len(tasks) > 1:
        pool = mp.get_context("spawn").Pool(min(workers, len(tasks)))
        results = pool.imap(_verify_shard, tasks)
    else:
        pool, results = None, map(_verify_shard, tasks)
    try:
        for errs, n in results:  # in shard order, so the report is the same whatever the worker count
            errors += errs
            samples += n
            bar.update(n)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
    if samples != manifest["totals"]["samples"]:
        errors.append(f"total: {samples} samples, manifest says {manifest['totals']['samples']}")
    return {"shards": len(manifest["shards"]), "samples": samples, "errors": errors}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="shard set: folder or fsspec URL")
    p.add_argument("--dwt-tol", type=float, default=0.2)
    p.add_argument("--dwt-mean-tol", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time (default 1)")
    a = p.parse_args(argv)
    with credentials_guard(a.out):  # refused credentials: the bucket and what to set, no traceback
        result = verify(a.out, a.dwt_tol, a.dwt_mean_tol, workers=a.workers)
    for e in result["errors"][:50]:
        print(f"MISMATCH {e}")
    if len(result["errors"]) > 50:
        print(f"... and {len(result['errors']) - 50} more")
    status = "OK" if not result["errors"] else f"{len(result['errors'])} MISMATCHES"
    print(f"{a.out}: {result['shards']} shards, {result['samples']} samples: {status}")
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
