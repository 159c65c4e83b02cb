"""The evaluation protocol: image sets (a folder or a shard set, read in a fixed order), the reference statistics
(computed once per set, protocol, side and count, and cached next to the set) and FID/KID/SWD of one image set
against another. `python -m trainer.evaluate` (its docstring has the protocols and the cache layout) is the
command over this; `evaluate_model` is what it runs for a model.
"""
from __future__ import annotations

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
from trainer.core.settings import FID_IMPLS, SamplingConfig
from trainer.train.rundir import RunDir

__all__ = ["image_source", "ImageSource", "reference_features", "compute_metrics", "evaluate_model", "eval_name",
           "METRICS"]

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
    from trainer.eval.metrics import FeatureReservoir, FeatureStats

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
    from trainer.eval.metrics import FeatureReservoir, FeatureStats

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
    from trainer.eval import metrics as M

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise SystemExit(f"error: --metrics {sorted(unknown)}: choose from {', '.join(METRICS)}")
    if fid_impl not in FID_IMPLS:
        raise SystemExit(f"error: --fid-impl {fid_impl}: choose from {', '.join(FID_IMPLS)}")
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




# --- a model's samples -----------------------------------------------------------------------------------------------

def eval_name(step: int | None, sampling: SamplingConfig) -> str:
    """The folder of one evaluation: step00001000-ddim250-eta1-n10000-seed0."""
    return f"step{step or 0:08d}-{sampling.describe()}"


def evaluate_model(ckpt: str, ref: ImageSource, sampling: SamplingConfig, metrics=("fid", "kid", "swd"), *,
                   out: str | Path | None = None, ref_n: int | None = None, swd_n: int = 4096,
                   side: int | None = None, batch: int = 64, dtype: str = "fp32", fid_impl: str = "tf",
                   record: bool = True, allow_unverified: bool = False, log=print) -> dict | None:
    """Sample `sampling.n` images from `ckpt` (a run, a tag folder, an export or a published URL) into OUT/images
    (default: RUN_DIR/eval/<eval_name> for a local run, ./eval/<model>/<eval_name> otherwise; a killed evaluation
    resumes its sampling), then compute `metrics` against `ref`. Rank 0 writes OUT/metrics.json and, for a local
    run with `record`, appends {"eval": true, ...} to its metrics.jsonl; it returns the result, other ranks None
    (they only sample)."""
    from trainer.core.sampling import sample_to_folder
    from trainer.core.settings import torch_dtype
    from trainer.train.distributed import distributed_context
    from trainer.weights.load import load_model

    rank, world, device = distributed_context()
    model, cfg, meta = load_model(ckpt, device=device, allow_unverified=allow_unverified)
    ckpt = meta["source"]  # without a pin
    run = RunDir.of_checkpoint(meta["checkpoint"]) if "://" not in ckpt and meta.get("kind") == "deepspeed" else None
    name = eval_name(meta.get("step"), sampling)
    if out is None:
        out = run.eval_dir(name) if run else Path("eval") / (Path(ckpt.rstrip("/")).stem or "model") / name
    out = Path(out)
    sample_to_folder(model, cfg, out, sampling, batch=batch, dtype=torch_dtype(dtype), rank=rank, world=world,
                     progress=rank == 0)
    del model
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank != 0:
        return None
    start = time.time()
    result = compute_metrics(image_source(str(out / "images")), ref, metrics, n=sampling.n, ref_n=ref_n,
                             swd_n=swd_n, side=side, device=device, batch=batch, seed=sampling.seed,
                             fid_impl=fid_impl, log=log)
    result = {"ckpt": ckpt, "step": meta.get("step"), "sampler": sampling.sampler, "steps": sampling.steps,
              "eta": sampling.eta, "clip_mode": sampling.clip_mode, "seed": sampling.seed, **result,
              "seconds": round(time.time() - start, 1)}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    if run is not None and record:
        run.append_metrics({"eval": True, **result})
    return result
