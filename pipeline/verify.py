"""Check a shard set against its manifest, decoding every sample.

    python -m pipeline.verify OUT [--dwt-tol 0.2] [--dwt-mean-tol 0.0164]

For every shard: present, size and sha256 as in the manifest, sample count as recorded; for every sample: a
256x256 (the set's --size) RGB JPEG, a parseable json, `cls` an integer, and, when the set has `dwt.f16`, its
shape and its values against the decoded JPEG. The DWT is computed from the uint8 crop before JPEG encoding:

  exactly, when this Pillow and libjpeg-turbo are those of the set's manifest: the crop is recovered from the
      bands (they hold it exactly) and re-encoded; it must give the jpg's bytes. Any wrong band, shift or scale
      fails, whatever the size or content.
  within JPEG's error, always (and alone where the encoder differs, or with --no-exact): the bands against the DWT
      of the decoded JPEG, mean absolute difference <= --dwt-mean-tol and each coefficient <= --dwt-tol.
      Derivation of the default (docs/format.md, "Checking a set"): at quality 95, 4:4:4, JPEG changes each
      8x8 DCT coefficient by at most half its quantisation step q; on content busy enough that every coefficient
      is quantised (noise: the most JPEG can do on average) the change is uniform, variance q^2/12. The Haar DWT
      is orthonormal, so the bands' RMS error is the pixels' RMS error: mean(q^2)/12 over the Y and CbCr tables,
      plus three roundings (1/12 each), mapped to RGB: 4.19 grey levels, 0.0164 in band units. The mean absolute
      error is at most the RMS: DWT_MEAN_TOL = 0.0164 at every crop size (measured on noise: 0.0125 at 256 px,
      at most 0.0141 for 8 px crops; real faces: at most 0.0113 at 32 px, 0.0047 at 256 px). The per-coefficient
      bound, 0.2, is a gross-error guard (noise reaches 0.092).
Exit status 1 on any mismatch.
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
from pipeline.imaging import crop_from_dwt_f16, encode_jpeg, haar_dwt_uint8
from pipeline.plan import environment
from pipeline.reader import iter_samples, load_manifest, sha256
from pipeline.schema import decode_dwt
from pipeline.store import Store

__all__ = ["verify", "main", "DWT_TOL", "DWT_MEAN_TOL"]

DWT_TOL = 0.2          # one band coefficient: a gross-error guard (JPEG q95 on noise reaches 0.092)
DWT_MEAN_TOL = 0.0164  # mean |error|: <= the RMS error of JPEG q95 4:4:4 on busy content (derivation above)


def _check_dwt(key: str, sample: dict, rgb: np.ndarray, size: int, exact: bool, tol: float, mean_tol: float
               ) -> list[str]:
    try:
        bands = decode_dwt(sample["dwt.f16"], size)
    except ValueError as e:
        return [f"{key}: {e}"]
    dwt = bands.astype(np.float32)
    diff = np.abs(dwt - haar_dwt_uint8(rgb))
    if not np.isfinite(dwt).all() or diff.max() > tol or diff.mean() > mean_tol:
        return [f"{key}: dwt.f16 differs from the DWT of the jpg: max {diff.max():.4f} (tol {tol}), "
                f"mean {diff.mean():.5f} (tol {mean_tol})"]
    if exact:
        crop = crop_from_dwt_f16(bands)
        if crop is None:
            return [f"{key}: dwt.f16 is not the float16 Haar DWT of any uint8 crop"]
        if encode_jpeg(crop) != sample["jpg"]:
            return [f"{key}: dwt.f16 is not the DWT of the crop the jpg was encoded from (re-encoding the crop it "
                    f"holds gives other JPEG bytes; within JPEG's error: max {diff.max():.4f}, "
                    f"mean {diff.mean():.5f})"]
    return []


def _check_sample(sample: dict, size: int, with_dwt: bool, exact: bool, tol: float, mean_tol: float
                  ) -> list[str]:
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
            errors += _check_dwt(key, sample, np.asarray(im), size, exact, tol, mean_tol)
    return errors


def _verify_shard(args) -> tuple[list[str], int]:
    out, entry, size, with_dwt, exact, tol, mean_tol = args
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
            errors += _check_sample(sample, size, with_dwt, exact, tol, mean_tol)
            n += 1
    except Exception as e:  # noqa: BLE001 - a tar that cannot be read to its end is a mismatch
        errors.append(f"{name}: unreadable after {n} samples: {e}")
    if n != entry["samples"]:
        errors.append(f"{name}: {n} samples, manifest says {entry['samples']}")
    return errors, n


def same_encoder(manifest: dict) -> bool:
    """Whether this process encodes JPEGs as the set's writer did (same Pillow and libjpeg-turbo)."""
    env, here = manifest.get("environment", {}), environment()
    return all(env.get(k) == here[k] for k in ("pillow", "libjpeg_turbo"))


def verify(out: str, tol: float = DWT_TOL, mean_tol: float = DWT_MEAN_TOL, progress: bool = True,
           workers: int = 1, exact: bool | None = None) -> dict:
    """Returns {'shards', 'samples', 'exact', 'errors': [...]}; errors empty means the set matches its manifest.
    `exact` (default: when the encoder is the manifest's) also requires each dwt.f16 to re-encode to its jpg."""
    manifest = load_manifest(Store(out))
    cfg = manifest["config"]
    exact = same_encoder(manifest) if exact is None else exact
    exact = exact if cfg["dwt"] else None  # None: no dwt.f16 to check
    tasks = [(out, entry, cfg["size"], cfg["dwt"], exact, tol, mean_tol) for entry in manifest["shards"]]
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
    return {"shards": len(manifest["shards"]), "samples": samples, "exact": exact, "errors": errors}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="shard set: folder or fsspec URL")
    p.add_argument("--dwt-tol", type=float, default=DWT_TOL)
    p.add_argument("--dwt-mean-tol", type=float, default=DWT_MEAN_TOL)
    p.add_argument("--no-exact", action="store_true", help="check the DWT within JPEG's error only")
    p.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time (default 1)")
    a = p.parse_args(argv)
    with credentials_guard(a.out):  # refused credentials: the bucket and what to set, no traceback
        result = verify(a.out, a.dwt_tol, a.dwt_mean_tol, workers=a.workers,
                        exact=False if a.no_exact else None)
    for e in result["errors"][:50]:
        print(f"MISMATCH {e}")
    if len(result["errors"]) > 50:
        print(f"... and {len(result['errors']) - 50} more")
    status = "OK" if not result["errors"] else f"{len(result['errors'])} MISMATCHES"
    if result["exact"] is False:
        print("note: dwt.f16 checked within JPEG's error only (--no-exact, or this Pillow/libjpeg-turbo is not the "
              "manifest's environment)")
    print(f"{a.out}: {result['shards']} shards, {result['samples']} samples: {status}")
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
