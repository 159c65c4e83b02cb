"""Sharding throughput: 1024x1024 face-like JPEGs -> 256 px crop + Haar DWT shards, the project's path against a
naive one, in the same run, one process each (images/s per core).

    python bench/shard_throughput.py [--n 200]

project: `pipeline.tarwriter.write_shard` — JPEG decoded at reduced size by libjpeg's DCT scaling, LANCZOS only if
         the scaled decode is not already at the target size, numpy Haar DWT, pre-encoded JPEG bytes (quality 95,
         4:4:4) in a deterministic tar.
naive:   full-size decode + Pillow LANCZOS resize + pywt.dwt2 per channel + webdataset.ShardWriter fed PIL objects.
The three paths take turns on four chunks of the corpus. Also printed: bytes per sample with and without
dwt.f16, and the loader-side read rate (webdataset iteration + JPEG decode, + frombuffer of the stored DWT) for
both shard kinds.
"""
from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.plan import ShardConfig
from pipeline.sources import folder_items
from pipeline.synthetic import synthetic_faces
from pipeline.tarwriter import write_shard


def make_corpus(root: Path, n: int, seed: int = 0) -> list[Path]:
    """n 1024x1024 JPEGs (quality 90, 4:2:0 like CelebA-HQ) of synthetic faces with photo-like grain, so their
    size (~250 KB) and decode cost resemble real CelebA-HQ files."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, face in enumerate(synthetic_faces(n, 256, seed)):
        big = np.asarray(Image.fromarray(face).resize((1024, 1024), Image.BICUBIC), dtype=np.float32)
        big += rng.normal(0, 6, big.shape).astype(np.float32)  # sensor-like grain
        p = root / f"{i:05d}.jpg"
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def project(src: Path, out: Path, dwt: bool, chunk: int, chunks: int) -> float:
    """Seconds to write shard `chunk` of `chunks` (the sources split evenly), the way pipeline.shard does."""
    items = folder_items(src).items
    n = len(items) // chunks
    cfg = ShardConfig(corpus="folder", src=str(src), out=str(out), dwt=dwt, shard_size=n)
    start = time.perf_counter()
    write_shard(cfg, chunk, items[chunk * n:(chunk + 1) * n])
    return time.perf_counter() - start


def naive(paths: list[Path], out: Path) -> float:
    """Seconds to write these sources the naive way."""
    import pywt
    import webdataset as wds

    start = time.perf_counter()
    with wds.ShardWriter(str(out / f"naive-{paths[0].stem}-%06d.tar"), maxcount=100000, verbose=0) as sink:
        for p in paths:
            im = Image.open(p).convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((256, 256), Image.LANCZOS)
            x = np.asarray(im, dtype=np.float32) / 255
            bands = []
            for c in range(3):
                cA, (cH, cV, cD) = pywt.dwt2(x[..., c], "haar")
                bands.append((cA, cH, cV, cD))
            dwt = np.stack([b[k] for k in range(4) for b in bands]).astype(np.float16)
            sink.write({"__key__": p.stem, "jpg": im, "dwt.npy": dwt})
    return time.perf_counter() - start


def read_rate(tar: Path, with_dwt: bool) -> tuple[float, int]:
    import webdataset as wds

    start, n = time.perf_counter(), 0
    for sample in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
        img = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        if with_dwt:
            bands = np.frombuffer(sample["dwt.f16"], "<f2").reshape(12, 128, 128)
            assert bands.shape[0] == 12 and img.shape == (256, 256, 3)
        n += 1
    return n / (time.perf_counter() - start), n


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="generated 1024x1024 JPEGs (a multiple of 4)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        paths = make_corpus(tmp / "src", args.n)
        src_mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
        for d in ("p_dwt", "p_jpg", "naive"):
            (tmp / d).mkdir()
        naive(paths[:5], tmp / "naive")  # warm caches and imports on both paths
        for f in (tmp / "naive").iterdir():
            f.unlink()
        # The three paths take turns on chunks of the corpus, so that drifting machine speed hits all alike.
        chunks, n = 4, args.n // 4 * 4
        secs = {"project (dwt)": 0.0, "naive (dwt)": 0.0, "project (--no-dwt)": 0.0}
        for c in range(chunks):
            secs["project (dwt)"] += project(tmp / "src", tmp / "p_dwt", True, c, chunks)
            secs["naive (dwt)"] += naive(paths[c * n // chunks:(c + 1) * n // chunks], tmp / "naive")
            secs["project (--no-dwt)"] += project(tmp / "src", tmp / "p_jpg", False, c, chunks)
        rates = {k: n / v for k, v in secs.items()}
        sizes = {k: sum(f.stat().st_size for f in (tmp / d).glob("*.tar")) / n for k, d in
                 (("with dwt.f16", "p_dwt"), ("jpg only", "p_jpg"))}
        reads = {"with dwt.f16": read_rate(tmp / "p_dwt" / "shard-000000.tar", True)[0],
                 "jpg only": read_rate(tmp / "p_jpg" / "shard-000000.tar", False)[0]}
        args.n = n
    print(f"{time.strftime('%Y-%m-%d')}, {cpu_name()}, Pillow {Image.__version__}, 1 process; "
          f"{args.n} sources of 1024x1024, {src_mb:.0f} KB each on average")
    print(f"{'path 1024 -> 256':<22} {'img/s/core':>11} {'vs naive':>9}")
    for k, v in rates.items():
        print(f"{k:<22} {v:>11.1f} {v / rates['naive (dwt)']:>8.2f}x")
    print(f"\n{'shard kind':<16} {'bytes/sample':>13} {'loader samples/s/core':>22}")
    for k in sizes:
        print(f"{k:<16} {sizes[k]:>13,.0f} {reads[k]:>22.0f}")


if __name__ == "__main__":
    main()
