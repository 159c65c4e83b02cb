r"""Offline evaluation: FID, KID and SWD of a model's samples (or of any image set) against a reference set.

    python -m trainer.evaluate --ckpt RUN_DIR_OR_URL --ref SHARDS_OR_DIR --n 10000 --steps 250 [--metrics fid,kid,swd]
    python -m trainer.evaluate --fake DIR_OR_SHARDS --ref DIR_OR_SHARDS [--metrics ...]      # existing images
    python -m trainer.evaluate --plot RUN_DIR [RUN_DIR ...] --out curves.png [--metrics fid,kid]
    torchrun --nproc_per_node 8 -m trainer.evaluate --ckpt ... --ref ... --n 10000   # sampling on 8 GPUs

Image sets (either side): a folder of images (png/jpg/jpeg/webp/bmp, searched recursively, sorted by path; e.g.
the original CelebA-HQ-img/ folder) or a shard set (a folder or URL with manifest.json: its `jpg` crops, in shard
order, which is a random order by identity).

FID/KID protocol, `--fid-impl` (trainer/metrics.py has the details; recorded as `fid_impl` in the results):
  tf (default)   the StyleGAN2-ADA convention: reference images are resized to the fake images' side (PIL bicubic,
                 antialiased; non-square ones centre-cropped first), then both sets, uint8 RGB at that side, go
                 through TF1's bilinear resize to 299 and (x - 128) / 128 into the TF FID Inception.
  pytorch-fid    the paper's code (jiachenlei/maskdm tools/pytorch_fid.py, a copy of pytorch-fid): both sets as they
                 are on disk, decoded to RGB with no crop, no pre-resize and no re-encode (a folder of 1024 px
                 originals is fed at 1024 px), then x / 255, bilinear F.interpolate to 299 x 299 (align_corners=False,
                 no antialias; a non-square image is stretched) and 2x - 1 into the same network weights.
The two give different FIDs on the same images (docs/performance.md): compare numbers of one protocol only.
SWD always compares both sets at one side (`--size`, default the first fake image's side).

The paper's protocol (the reference sampler: DDIM, eta 1, `--clip-mode reference`; the reference FID:
`--fid-impl pytorch-fid`), against the complete CelebA-HQ (all 30,000 images) as the reference set, either the
original image folder (`--ref CelebAMask-HQ/CelebA-HQ-img`) or its shards
(`python -m pipeline.shard celebahq --src CelebAMask-HQ --out shards/celebahq-all --split all --no-dwt`: 256 px
crops, JPEG q95; the two references give slightly different FIDs: say which one with a figure):
    # Tab. 2, FID-30k with 500 DDIM steps
    python -m trainer.evaluate --ckpt RUN_DIR --ref shards/celebahq-all --n 30000 --steps 500 --sampler ddim \
        --eta 1 --clip-mode reference --fid-impl pytorch-fid --metrics fid
    # Tab. 3, FID-10k with 250 DDIM steps
    python -m trainer.evaluate --ckpt RUN_DIR --ref shards/celebahq-all --n 10000 --steps 250 --sampler ddim \
        --eta 1 --clip-mode reference --fid-impl pytorch-fid --metrics fid
(`--ref-n` unset: every reference image.) The reference statistics are computed once and cached (below).

Protocol (the paper's FID-N): N generated images (`--n`, 10k or 50k) against the whole training set (`--ref-n`
unset: every image of the reference); state N with every figure. KID: 100 subsets of min(1000, N) images. SWD:
ProGAN's protocol on the first min(N, --swd-n) images of each side (the same count on both; descriptors of 75 KB
per image and pyramid level are held in memory).

Reference statistics (Inception mean/covariance and a seeded 10k-feature sample for KID) are computed once per
reference set, FID protocol, side and image count, and cached next to it: `REF/eval-cache/ref-<key>-<side>px-<n>.*.npz`
(tf) or `REF/eval-cache/ref-<key>-pytorch-fid-native-<n>.*.npz` (pytorch-fid), the key being the sha256 of the shard
set's manifest.json (or, for a folder, of its file list with sizes and modification times). Where the set is
read-only the cache goes to ~/.cache/maskdm/eval/. SWD is not cached.

With --ckpt the samples go to `--out` (default: RUN_DIR/eval/<tag>/ for a local run, ./eval/<name>/ otherwise);
a killed evaluation resumes its sampling. Results are printed as JSON, written to OUT/metrics.json, and, for a
local run directory, appended to RUN_DIR/metrics.jsonl with the checkpoint's step (what --plot and the model
card of `trainer.export` read).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.credentials import credentials_guard
from trainer.diffusion import CLIP_MODES
from trainer.metrics import FID_IMPLS
from trainer.sample import DTYPES, distributed_context, sample_to_folder

__all__ = ["image_source", "ImageSource", "reference_features", "compute_metrics", "plot_runs", "main"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRICS = ("fid", "kid", "swd")
KID_RESERVOIR = 10_000
CACHE_VERSION = 1


# --- image sets ------------------------------------------------------------------------------------------------------

def _square_resize(img, side: int | None) -> np.ndarray:
    """PIL image -> (3, side, side) uint8: centre square crop, then bicubic (antialiased) resize if needed;
    side None: the image as loaded, (3, H, W) RGB (pytorch-fid's ImagePathDataset: .convert("RGB") only)."""
    from PIL import Image

    img = img.convert("RGB")
    if side is None:
        return np.asarray(img).transpose(2, 0, 1)
    w, h = img.size
    if w != h:
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if img.size != (side, side):
        img = img.resize((side, side), Image.BICUBIC)
    return np.asarray(img).transpose(2, 0, 1)


class ImageSource:
    """An image folder or a shard set, read in a fixed order as uint8 (B, 3, side, side) batches, or (side None)
    as lists of uint8 (3, H, W) images at the size they have on disk (a folder's files are decoded, never
    re-encoded; a shard set's are its `jpg` crops)."""

    def __init__(self, source: str):
        self.source = source.rstrip("/")
        self.kind, self.files, self.store = None, [], None
        if "://" not in source and Path(source).is_dir() and not (Path(source) / "manifest.json").is_file():
            self.kind = "folder"
            self.files = sorted(p for p in Path(source).rglob("*")
                                if p.suffix.lower() in IMAGE_EXTS and "eval-cache" not in p.parts)
            if not self.files:
                raise SystemExit(f"error: {source}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
        else:
            from pipeline.reader import load_manifest
            from pipeline.store import Store

            self.kind, self.store = "shards", Store(self.source)
            if "://" not in source and not Path(source).exists():
                raise SystemExit(f"error: {source}: no such folder or shard set")
            self.manifest = load_manifest(self.store)

    def __len__(self) -> int:
        return len(self.files) if self.kind == "folder" else self.manifest["totals"]["samples"]

    def key(self) -> str:
        """Identity of the set's content: the manifest's sha256, or the file list with sizes and mtimes."""
        if self.kind == "shards":
            with credentials_guard(self.source):
                return hashlib.sha256(self.store.read_bytes("manifest.json")).hexdigest()
        h = hashlib.sha256()
        for p in self.files:
            st = p.stat()
            h.update(f"{p.relative_to(self.source)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def first_side(self) -> int:
        from PIL import Image

        img = Image.open(next(iter(self._encoded(1)))) if self.kind == "shards" else Image.open(self.files[0])
        return min(img.size)

    def _encoded(self, limit: int | None) -> Iterator:
        """File paths or BytesIO of the first `limit` images."""
        if self.kind == "folder":
            yield from self.files[:limit]
            return
        from pipeline.reader import iter_samples

        n = 0
        for entry in self.manifest["shards"]:
            with credentials_guard(self.source):  # a token expiring mid-way: the bucket and what to set
                data = self.store.read_bytes(entry["name"])
            for sample in iter_samples(data):
                if limit is not None and n >= limit:
                    return
                if "jpg" not in sample:
                    continue
                n += 1
                yield io.BytesIO(sample["jpg"])

    def batches(self, side: int | None, limit: int | None = None, batch: int = 64, desc: str = "") -> Iterator:
        from PIL import Image

        total = len(self) if limit is None else min(limit, len(self))
        bar = tqdm(total=total, unit="img", desc=desc or self.source, dynamic_ncols=True, leave=False)
        chunk = []
        for item in self._encoded(limit):
            try:
                chunk.append(_square_resize(Image.open(item), side))
            except OSError as e:
                name = getattr(item, "name", item)
                raise SystemExit(f"error: {self.source}: cannot read image {name}: {e}") from None
            if len(chunk) == batch:
                bar.update(len(chunk))
                yield self._collate(chunk, side)
                chunk = []
        if chunk:
            bar.update(len(chunk))
            yield self._collate(chunk, side)
        bar.close()

    @staticmethod
    def _collate(chunk: list[np.ndarray], side: int | None):
        if side is None:
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in chunk]              # [(3, H_i, W_i)]
        return torch.from_numpy(np.stack(chunk))                                           # (B, 3, side, side)


def image_source(source: str) -> ImageSource:
    return ImageSource(source)


# --- features and the reference cache --------------------------------------------------------------------------------

def _features(src: ImageSource, side: int | None, limit: int | None, inception, batch: int, desc: str):
    from trainer.metrics import FeatureReservoir, FeatureStats

    stats, reservoir = FeatureStats(), FeatureReservoir(KID_RESERVOIR, seed=0)
    for images in src.batches(side, limit, batch, desc=desc):
        f = inception(images)
        stats.update(f)
        reservoir.update(f)
    return stats, reservoir


class _Cache:
    """Files next to a reference set (local folder or bucket), else in ~/.cache/maskdm/eval/<key>/."""

    def __init__(self, src: ImageSource, stem: str, log=print):
        self.src, self.stem, self.log = src, stem, log
        self.fallback = Path(os.environ.get("MASKDM_CACHE", Path.home() / ".cache" / "maskdm")) / "eval"

    def _remote(self, name: str) -> str:
        return f"eval-cache/{self.stem}.{name}.npz"

    def load(self, name: str, loader):
        local = self.fallback / f"{self.stem}.{name}.npz"
        if local.is_file():
            return loader(local)
        if self.src.kind == "folder":
            path = Path(self.src.source) / self._remote(name)
            return loader(path) if path.is_file() else None
        if not self.src.store.exists(self._remote(name)):
            return None
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "x.npz"
            tmp.write_bytes(self.src.store.read_bytes(self._remote(name)))
            return loader(tmp)

    def save(self, name: str, obj) -> str:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d) / "x.npz"
            obj.save(tmp)
            try:
                if self.src.kind == "folder":
                    dest = Path(self.src.source) / self._remote(name)
                    dest.parent.mkdir(exist_ok=True)
                    part = dest.with_suffix(".part")
                    part.write_bytes(tmp.read_bytes())
                    os.replace(part, dest)
                    return str(dest)
                self.src.store.makedirs("eval-cache")
                self.src.store.fs.put_file(str(tmp), self.src.store.path(self._remote(name)))
                return f"{self.src.store.url}/{self._remote(name)}"
            except (OSError, PermissionError) as e:  # read-only dataset folder or bucket
                self.fallback.mkdir(parents=True, exist_ok=True)
                dest = self.fallback / f"{self.stem}.{name}.npz"
                shutil.copyfile(tmp, dest)
                self.log(f"reference cache: cannot write next to {self.src.source} ({e}); cached in {dest}")
                return str(dest)


def _cache_stem(src: ImageSource, side: int | None, n: int, fid_impl: str) -> str:
    """tf: ref-v1-<key>-<side>px-<n> (the name from before --fid-impl existed: old caches stay valid);
    pytorch-fid: ref-v1-<key>-pytorch-fid-native-<n> (its features never mix with tf's)."""
    if fid_impl == "tf":
        assert side is not None, "the tf protocol compares at one side"
        return f"ref-v{CACHE_VERSION}-{src.key()[:16]}-{side}px-{n}"
    assert side is None, f"the {fid_impl} protocol feeds images as loaded, got side {side}"
    return f"ref-v{CACHE_VERSION}-{src.key()[:16]}-{fid_impl}-native-{n}"


def reference_features(src: ImageSource, side: int | None, limit: int | None, inception, batch: int = 64,
                       log=print):
    """(FeatureStats, FeatureReservoir) of the reference set (at `side` px, or None: as loaded) with this
    InceptionFeatures (its `impl` is part of the cache key): from the cache, or computed and cached."""
    from trainer.metrics import FeatureReservoir, FeatureStats

    n = len(src) if limit is None else min(limit, len(src))
    cache = _Cache(src, _cache_stem(src, side, n, inception.impl), log)
    stats, reservoir = cache.load("stats", FeatureStats.load), cache.load("kid", FeatureReservoir.load)
    if stats is not None and reservoir is not None:
        log(f"reference statistics from the cache ({cache.stem}, {stats.n} images)")
        return stats, reservoir
    start = time.time()
    stats, reservoir = _features(src, side, limit, inception, batch, desc=f"reference features {src.source}")
    where = cache.save("stats", stats)
    cache.save("kid", reservoir)
    log(f"reference statistics of {stats.n} images in {time.time() - start:.0f} s, cached: {where}")
    return stats, reservoir


# --- metrics ---------------------------------------------------------------------------------------------------------

def compute_metrics(fake: ImageSource, ref: ImageSource, metrics=METRICS, *, n: int | None = None,
                    ref_n: int | None = None, swd_n: int = 4096, side: int | None = None, device="cpu",
                    batch: int = 64, seed: int = 0, fid_impl: str = "tf", log=print) -> dict:
    """{metric: value, ...} of `fake` (its first n images) against `ref` (its first ref_n, default all), both at
    `side` px (default: the side of the first fake image); with fid_impl "pytorch-fid" FID/KID see both sets as
    loaded (`side` is then SWD's only)."""
    from trainer import metrics as M

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise SystemExit(f"error: --metrics {sorted(unknown)}: choose from {', '.join(METRICS)}")
    if fid_impl not in M.FID_IMPLS:
        raise SystemExit(f"error: --fid-impl {fid_impl}: choose from {', '.join(M.FID_IMPLS)}")
    side = side or fake.first_side()
    if "swd" in metrics:
        levels = M.swd_resolutions(side)
        if not levels or side % 2 ** (len(levels) - 1):
            raise SystemExit(f"error: SWD compares images whose side halves evenly down to 16..31 px (64, 128, "
                             f"256, ...), these are {side} px: pass --size 64 (or another such side) or leave swd "
                             f"out of --metrics")
    n_fake = len(fake) if n is None else min(n, len(fake))
    if n is not None and n_fake < n:
        raise SystemExit(f"error: {fake.source} has {len(fake)} images, fewer than --n {n}")
    out: dict = {"n": n_fake, "side": side, "fake": fake.source, "ref": ref.source,
                 "ref_n": len(ref) if ref_n is None else min(ref_n, len(ref))}
    if {"fid", "kid"} & set(metrics):
        inception = M.InceptionFeatures(device, batch_size=batch, impl=fid_impl)
        fid_side = side if fid_impl == "tf" else None                  # pytorch-fid: as loaded, 299 px inside
        out["fid_impl"] = fid_impl
        ref_stats, ref_res = reference_features(ref, fid_side, ref_n, inception, batch, log)
        fake_stats, fake_res = _features(fake, fid_side, n_fake, inception, batch, desc="features of the samples")
        if "fid" in metrics:
            out["fid"] = M.fid(fake_stats, ref_stats)
        if "kid" in metrics:
            size = min(1000, len(fake_res), len(ref_res))
            out["kid"], out["kid_std"] = M.kid(fake_res.features, ref_res.features, subset_size=size, seed=seed)
            out["kid_subset_size"] = size
    if "swd" in metrics:
        k = min(n_fake, out["ref_n"], swd_n)
        sets = [M.SWDDescriptors(side, seed), M.SWDDescriptors(side, seed + 1)]
        for desc, src in zip(sets, (fake, ref)):
            for images in src.batches(side, k, batch, desc=f"SWD descriptors {src.source}"):
                desc.update(images)
        levels = M.swd(*sets, seed=seed)
        out["swd"] = levels.pop("SWDx1e3_avg")
        out["swd_levels"] = {k.split("_")[-1]: v for k, v in levels.items()}
        out["swd_n"] = k
    return out


# --- curves ----------------------------------------------------------------------------------------------------------

def plot_runs(runs: list[str], out: str | Path, metrics=("fid",)) -> Path:
    """Metric-vs-step curves (one panel per metric, one line per run and protocol) from the runs' metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('error: --plot needs matplotlib: pip install matplotlib (or pip install -e ".[eval]")') \
            from None
    from trainer.checkpoints import read_metrics

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    drawn = 0
    for ax, metric in zip(axes[0], metrics):
        for run in runs:
            path = Path(run) / "metrics.jsonl"
            if not path.is_file():
                raise SystemExit(f"error: --plot {run}: no metrics.jsonl (not a run directory)")
            series: dict[str, list] = {}
            for rec in read_metrics(run):
                if metric in rec and rec.get("step") is not None:
                    impl = "" if rec.get("fid_impl", "tf") == "tf" or metric == "swd" else f", {rec['fid_impl']}"
                    label = f"{Path(run).name} (N={rec.get('n')}, {rec.get('sampler', '')}{rec.get('steps', '')}{impl})"
                    series.setdefault(label, []).append((rec["step"], rec[metric]))
            for label, points in series.items():
                points.sort()
                ax.plot(*zip(*points), marker="o", label=label)
                drawn += 1
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.upper() + (" (x1e3)" if metric == "swd" else ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if not drawn:
        raise SystemExit(f"error: --plot: no {'/'.join(metrics)} records in {runs}: run trainer.evaluate --ckpt first")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --- CLI -------------------------------------------------------------------------------------------------------------

def _default_out(ckpt: str, meta: dict, args) -> Path:
    clip = "" if args.clip_mode == "rederive" else f"-clip{args.clip_mode}"
    name = f"step{meta.get('step') or 0:08d}-{args.sampler}{args.steps}-eta{args.eta:g}{clip}-n{args.n}-seed{args.seed}"
    if "://" not in ckpt and meta.get("kind") == "deepspeed":
        run = Path(meta["checkpoint"]).parent.parent
        return run / "eval" / name
    return Path("eval") / (Path(ckpt.rstrip("/")).stem or "model") / name


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--ckpt", help="model to sample: run dir, checkpoint tag dir, .safetensors or published URL")
    what.add_argument("--fake", help="existing images: a folder or a shard set")
    what.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="draw metric-vs-step curves of these runs")
    p.add_argument("--ref", help="reference images: a folder or a shard set (e.g. the training shards)")
    p.add_argument("--n", "--num-images", dest="n", type=int, help="images to sample / to take from --fake "
                   "(--ckpt default 10000; --fake default: all)")
    p.add_argument("--ref-n", type=int, help="reference images to use (default: all, the FID-N protocol)")
    p.add_argument("--size", type=int, help="compare at this side in px, both sets resized (default: the side "
                   "of the first --fake/sampled image); with --fid-impl pytorch-fid for SWD only")
    p.add_argument("--swd-n", type=int, default=4096, help="images per side for SWD (memory: 75 KB/image/level)")
    p.add_argument("--metrics", default="fid,kid,swd", help="comma-separated: fid, kid, swd")
    p.add_argument("--fid-impl", default="tf", choices=FID_IMPLS,
                   help="FID/KID Inception protocol: tf (default; TF-FID resize, reference resized to the fake "
                   "side) or pytorch-fid (the paper's code: both sets as loaded, bilinear F.interpolate to 299)")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1, as the reference evaluates)")
    p.add_argument("--clip-mode", default="rederive", choices=CLIP_MODES,
                   help="DDIM after clipping x0: rederive eps (default) or keep the raw eps (reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (sampling and features)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="sampling autocast dtype on GPUs")
    p.add_argument("--out", help="--ckpt: the samples' folder; --plot: the PNG")
    p.add_argument("--no-record", action="store_true", help="do not append the result to the run's metrics.jsonl")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.plot:
        print(plot_runs(args.plot, args.out or "curves.png", metrics))
        return
    if not args.ref:
        raise SystemExit("error: --ref is required: the reference images (a folder or a shard set)")
    ref = image_source(args.ref)
    rank, world, device = distributed_context()
    record_path, extra = None, {}
    if args.ckpt:
        from trainer.weights import load_model

        args.n = args.n or 10_000
        model, cfg, meta = load_model(args.ckpt, device=device)
        out = Path(args.out) if args.out else _default_out(args.ckpt, meta, args)
        sample_to_folder(model, cfg, out, n=args.n, seed=args.seed, steps=args.steps, sampler=args.sampler,
                         eta=args.eta, batch=args.batch, dtype=DTYPES[args.dtype], rank=rank, world=world,
                         progress=rank == 0, clip_mode=args.clip_mode)
        del model
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        if rank != 0:
            return
        fake = image_source(str(out / "images"))
        extra = {"ckpt": args.ckpt, "step": meta.get("step"), "sampler": args.sampler, "steps": args.steps,
                 "eta": args.eta, "clip_mode": args.clip_mode, "seed": args.seed}
        if meta.get("kind") == "deepspeed" and not args.no_record:
            record_path = Path(meta["checkpoint"]).parent.parent / "metrics.jsonl"
    else:
        fake, out = image_source(args.fake), None
    if rank != 0:
        return
    start = time.time()
    result = compute_metrics(fake, ref, metrics, n=args.n, ref_n=args.ref_n, swd_n=args.swd_n, side=args.size,
                             device=device, batch=args.batch, seed=args.seed, fid_impl=args.fid_impl)
    result = {**extra, **result, "seconds": round(time.time() - start, 1)}
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
    if record_path is not None:
        with open(record_path, "a") as f:
            f.write(json.dumps({"eval": True, **result}) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
