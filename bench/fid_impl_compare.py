"""FID of the same image sets under both protocols of `trainer.evaluate --fid-impl` (tf, pytorch-fid).

    python bench/fid_impl_compare.py [--n 300] [--size 256] [--data ../shared/data] [--work /tmp/fid-impl-compare]

Sets, from the real faces in ../shared/data, written to --work (never into the repository):
  lfw       the first N LFW deep-funneled faces (250 x 250 JPEG);
  celeba_a  the first N CelebA aligned faces (89 x 109 JPEG), celeba_b the next N (disjoint, same corpus).
--size 256 (default): each image centre-cropped to a square and resized with PIL bicubic to 256 px, saved as PNG,
so both protocols see identical 256 px pixels (the paper's case: 256 px samples against 256 px crops) and differ
only by the Inception-side resize to 299 and the input scaling. --size 0: the JPEG files as they are in the tars
(native sizes; tf then centre-crops and bicubic-resizes the reference to the fake side, pytorch-fid stretches every
image to 299 x 299).

Rows: FID(lfw, celeba_a) and FID(celeba_b, celeba_a) through `trainer.eval.protocol.compute_metrics(..., fid_impl=)`,
the evaluator's own path (folder reading, reference cache). celeba_a is the reference of both rows: its features are
computed in the first row of each protocol and read from the cache in the second (so that row's seconds are the
fake set's features only). Inception forwards: 3 N per protocol.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image

from trainer.eval.metrics import FID_IMPLS
from trainer.eval.protocol import compute_metrics, image_source

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def extract(tar_path: Path, out_dirs: list[Path], n: int, size: int) -> None:
    """The first len(out_dirs) * n JPEGs of a tar, n per folder, as the files (size 0) or as size px PNGs."""
    for d in out_dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    i = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not (member.isfile() and member.name.lower().endswith(".jpg")):
                continue
            data, dest = tar.extractfile(member).read(), out_dirs[i // n] / f"{i % n:05d}"
            if size:
                im = Image.open(io.BytesIO(data)).convert("RGB")
                s = min(im.size)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC).save(f"{dest}.png")
            else:
                Path(f"{dest}.jpg").write_bytes(data)
            i += 1
            if i == n * len(out_dirs):
                return
    raise SystemExit(f"error: {tar_path} has fewer than {n * len(out_dirs)} JPEGs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="images per set")
    ap.add_argument("--size", type=int, default=256, help="px of the prepared PNGs; 0: the JPEGs as in the tars")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--impls", default=",".join(FID_IMPLS))
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MASKDM_SHARED_DATA",
                                                                        REPO.parent / "shared" / "data")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/fid-impl-compare"))
    args = ap.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, N = {args.n}, "
          + (f"{args.size} px PNG (centre square, bicubic)" if args.size else "native JPEGs"))
    sets = {name: args.work / name for name in ("lfw", "celeba_a", "celeba_b")}
    extract(args.data / "lfw-deepfunneled.tar", [sets["lfw"]], args.n, args.size)
    extract(args.data / "celeba-10k-aligned-89x109.tar", [sets["celeba_a"], sets["celeba_b"]], args.n, args.size)
    os.environ["MASKDM_CACHE"] = str(args.work / "home-cache")           # never the user's ~/.cache
    rows, quiet = [], (lambda *a, **k: None)
    for impl in args.impls.split(","):
        for fake in ("lfw", "celeba_b"):
            start = time.perf_counter()
            r = compute_metrics(image_source(str(sets[fake])), image_source(str(sets["celeba_a"])), ("fid",),
                                batch=args.batch, fid_impl=impl, log=quiet)
            rows.append((impl, f"{fake} vs celeba_a", r["n"], r["fid"], time.perf_counter() - start))
    print("\n| mode | sets | N | FID | seconds |\n|---|---|---:|---:|---:|")
    for impl, pair, n, value, secs in rows:
        print(f"| {impl} | {pair} | {n} | {value:.3f} | {secs:.0f} |")
    by = {(impl, pair): value for impl, pair, _, value, _ in rows}
    for pair in dict.fromkeys(p for _, p, *_ in rows):
        if ("tf", pair) in by and ("pytorch-fid", pair) in by:
            tf, pf = by["tf", pair], by["pytorch-fid", pair]
            print(f"{pair}: pytorch-fid - tf = {pf - tf:+.3f} ({(pf - tf) / tf:+.2%} of tf)")
    for d in sets.values():                                             # the reference caches of this run
        shutil.rmtree(d / "eval-cache", ignore_errors=True)


if __name__ == "__main__":
    main()
