"""Shard sets -> model inputs: sources, sample decoding and device batching (bucket access: `trainer.data.bucket`).

Part 1 of the streaming loader (issue 4). What is here is independent of how the stream is split and ordered:
- `register_fsspec_schemes()` (from `trainer.data.bucket`, re-exported here): webdataset 1.0 opens `s3://`, `gs://`, ...
  URLs through fsspec (one filesystem per process) as `ResumableObject`s, instead of `pipe:` subprocesses
  (docs/design.md). Bucket faults, retries and fsspec/s3fs configuration: see `trainer.data.bucket`.
- `list_shards(source)`: a shard-set folder or URL (its manifest.json gives the shards and their sample counts),
  a brace pattern (`dir/shard-{000000..000099}.tar`), or one `.tar`. `check_sources` fails fast, before a run
  directory exists, on a source that is none of these (no such path, a folder of images, an interrupted job).
- `tar_samples`: a shard's bytes -> grouped samples, read as a plain tar (never decompressed: a gzip stream named
  `.tar` is refused, not inflated); a member larger than its sample can be (`pipeline.imaging.max_member_bytes`,
  from the tar header) is never read.
- `decode_sample`: a grouped tar sample -> {"dwt": (12, h, w) float16} when the set stores `dwt.f16` and the model
  runs in DWT mode, else {"img": (3, H, W) uint8} (resized for pixel mode). Every sample is checked against the
  crop side it must have (its set's manifest; in DWT mode the model's) before `collate` sees it: the bands' length
  and values (finite, in the DWT's range), the image's format (JPEG) and size from its header, before decoding
  (`pipeline.imaging.open_image`, the pipeline's own limits). A refused sample raises `BadSample(reason)`, counted
  by the stream under that reason. Horizontal flips are applied here:
  in DWT space a flip reverses every band along the width and negates cV and cD (a <-> b, c <-> d in each
  2x2 block), so both shard kinds flip identically.
- `collate` + `to_model_input`: a batch may mix both kinds (sets with and without `dwt.f16`); on the device,
  images get their DWT computed in one batched call (`trainer.core.dwt.dwt2`), so `--no-dwt` shards train identically
  up to JPEG rounding. Normalisation (cA -> 2cA - 1, pixels -> [-1, 1]) happens there too.
- `SkipCounter`: skipped samples are counted by reason and by shard (a lost shard counts the samples it lost:
  its manifest's count minus those read), with rate-limited warnings, never raised.
"""
from __future__ import annotations

import io
import logging
import math
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.credentials import credentials_guard, is_bucket
from pipeline.imaging import MAX_CROP_SIDE, SHARD_IMAGE_FORMATS, BadInput, open_image
from pipeline.reader import group_by_key, load_manifest, missing_manifest, split_member
from pipeline.schema import MANIFEST, decode_dwt
from pipeline.store import Store
from trainer.core.dwt import dwt2, normalize_bands
from trainer.core.settings import INPUT_MODES
from trainer.data.bucket import (FSSPEC_SCHEMES, RETRIES, BadObjectError, ResumableObject, _fs_for, _retry_settings,
                                 _with_retries, credentials_message, is_credentials_error, is_transient,
                                 register_fsspec_schemes)

# The first eight are trainer.data.bucket's, re-exported (RETRIES is that module's Counter, not a copy).
__all__ = ["FSSPEC_SCHEMES", "register_fsspec_schemes", "RETRIES", "ResumableObject", "BadObjectError",
           "is_transient", "is_credentials_error", "credentials_message", "Shard", "list_shards", "check_sources",
           "tar_samples", "BadSample",
           "decode_sample", "flip_dwt", "collate", "to_model_input", "SkipCounter"]

log = logging.getLogger(__name__)


# --- shard lists -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # from the manifest; None when the source is a bare pattern
    size: int | None = None  # side of the set's crops in pixels (the manifest's config.size); None for a pattern
    bytes: int | None = None  # the tar's size (manifest); None for a pattern


def list_shards(source: str) -> list[Shard]:
    """Shards of one source: a shard-set folder/URL (with manifest.json), a brace pattern, or a single tar. A bucket
    is contacted here first (the manifest, or the first shard of a pattern), with retries on transient errors;
    refused credentials stop the run (SystemExit) with a message naming the bucket and the variables to set."""
    from braceexpand import braceexpand

    bucket = is_bucket(source)
    with credentials_guard(source):
        if "{" in source or source.endswith(".tar"):
            shards = [Shard(url, None) for url in braceexpand(source)]
            if bucket and shards:  # fail early on credentials; a missing shard is counted when it is read
                _with_retries(lambda: _probe(shards[0].url), source, "checking", *_retry_settings())
            return shards
        store = Store(source)
        manifest = _with_retries(lambda: load_manifest(store), source, "reading the manifest of",
                                 *_retry_settings()) if bucket else load_manifest(store)
    base = store.root if store.local else store.url
    size = manifest.get("config", {}).get("size")
    return [Shard(f"{base}/{entry['name']}", entry["samples"], size, entry.get("bytes"))
            for entry in manifest["shards"]]


def check_sources(sources, where: str = "data.sources") -> None:
    """Fail fast (SystemExit naming the source and the fix) on a data source that cannot be trained on, before a
    run directory is made: one request per source (the manifest's existence, or a pattern's first shard), the
    folder listed only when it is not a shard set (`pipeline.reader.missing_manifest`)."""
    from braceexpand import braceexpand

    if not sources:
        raise SystemExit(f"error: {where} is empty: give shard sets made by `python -m pipeline.shard folder --src "
                         f"DIR --out SHARDS`, e.g. --set data.sources=[SHARDS]")
    for source in sources:
        with credentials_guard(source):
            if "{" in source or source.endswith(".tar"):
                first = next(iter(braceexpand(source)))
                if not is_bucket(source) and not Path(first).is_file():
                    raise SystemExit(f"error: {where}: {source}: {first} not found (a pattern's shards must exist)")
                if is_bucket(source):
                    _with_retries(lambda: _probe(first), source, "checking", *_retry_settings())
                continue
            store = Store(source)
            found = _with_retries(lambda: store.exists(MANIFEST), source, "checking", *_retry_settings())
            if not found:
                raise SystemExit(f"error: {where}: {source}/{MANIFEST} not found: {missing_manifest(store)}")


def _probe(url: str) -> None:
    try:
        _fs_for(url.split("://", 1)[0]).info(url.split("://", 1)[1])
    except FileNotFoundError:
        pass


# --- samples ---------------------------------------------------------------------------------------------------

def flip_dwt(bands: torch.Tensor) -> torch.Tensor:
    """The DWT of the horizontally flipped image, from the DWT (..., 12, h, w): every band reversed along the
    width, cV and cD (channels 6..11) negated."""
    out = bands.flip(-1)
    out[..., 6:12, :, :] = -out[..., 6:12, :, :]
    return out


class BadSample(ValueError):
    """A sample the stream skips, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def tar_samples(fileobj, url: str, max_member: int):
    """A plain tar stream -> samples {"__key__", "__url__", ext: bytes}, grouped as `pipeline.reader.group_by_key`
    does (a sample is complete when the next key's header arrives: a cut inside it loses only that one). Never
    decompressed (mode "r|": a compressed stream fails at its first header); a member over `max_member` bytes by
    its header is skipped unread, its value None (`decode_sample` refuses that sample). Raises on a truncated or
    unreadable tar."""
    current = None
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            tar.members = []  # streaming: keep no list of the members read
            if not info.isreg():
                continue
            key, ext = split_member(info.name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = tar.extractfile(info).read() if info.size <= max_member else None
    if current is not None:
        yield current


def decode_sample(sample: dict, mode: str, resolution: int | None = None, flip: bool = False,
                  on_resize=None, side: int | None = None) -> dict:
    """One tar sample -> {"dwt": (12, h, w) float16} or {"img": (3, H, W) uint8}, plus "key". `side`: the crop side
    the sample must have (its set's manifest, or a DWT model's); None: any up to MAX_CROP_SIDE. Raises BadSample
    (another size, a refused format or member, bad band values) or another error on a corrupt sample (the caller
    counts both). `resolution`: pixel-mode side (crops are resized to it when they differ, and `on_resize((w, h))`
    is called first: resizing is silent otherwise)."""
    if mode not in INPUT_MODES:
        raise ValueError(f"unknown input mode {mode!r}; choose one of {INPUT_MODES}")
    key = sample["__key__"]
    if oversized := [ext for ext, v in sample.items() if v is None and not ext.startswith("__")]:
        raise BadSample("oversized member", f"{', '.join(oversized)} larger than a sample can be (not read)")
    if mode == "dwt" and "dwt.f16" in sample:
        bands = torch.from_numpy(_bands(sample["dwt.f16"], side).copy())
        return {"key": key, "dwt": flip_dwt(bands) if flip else bands}
    try:  # the header only: format and size are checked before anything is decoded
        im = open_image(sample["jpg"], (side or MAX_CROP_SIDE) ** 2, SHARD_IMAGE_FORMATS)
    except BadInput as e:
        raise BadSample(e.reason, f"jpg: {e.detail}") from None
    if side is not None and im.size != (side, side) or max(im.size) > MAX_CROP_SIDE:
        raise BadSample("wrong size", f"jpg is {im.size[0]}x{im.size[1]}, expected {side or MAX_CROP_SIDE} px")
    im = im.convert("RGB")
    if mode == "pixel" and resolution and im.size != (resolution, resolution):
        if on_resize is not None:
            on_resize(im.size)
        im = im.resize((resolution, resolution), Image.LANCZOS)
    img = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    return {"key": key, "img": img.flip(-1) if flip else img}


_F16_TWO, _F16_ONE, _F16_MAGNITUDE = 0x4000, 0x3C00, 0x7FFF  # float16 bit patterns of 2.0 and 1.0; |x| mask


def _bands(data: bytes, side: int | None) -> np.ndarray:
    """`dwt.f16` bytes -> (12, side/2, side/2) float16, refused unless of that length (any square side without
    `side`) and with every value finite and in the range of a DWT of a [0, 1] image: cA in [0, 2], details in
    [-1, 1]. Checked on the bit patterns (non-negative float16 order like their bits; NaN and inf lie above
    every finite value), ~100x faster than float16 comparisons."""
    n = side // 2 if side else math.isqrt(len(data) // (2 * 12))
    try:
        bands = decode_dwt(data, 2 * n)
    except ValueError as e:
        raise BadSample("wrong size", str(e)) from None
    bits = bands.view(np.uint16)
    if bits[:3].max() > _F16_TWO or (bits[3:] & _F16_MAGNITUDE).max() > _F16_ONE:  # cA: a sign bit is over it too
        raise BadSample("bad values", "dwt.f16 holds non-finite or out-of-range values (cA in [0, 2], details "
                                      "in [-1, 1])")
    return bands


def collate(samples: list[dict]) -> dict:
    """Decoded samples -> {"dwt": (Bd, 12, h, w) float16, "img": (Bi, 3, H, W) uint8, "keys": [...]} (a kind
    present only if some sample has it; keys ordered dwt samples first, then images, matching `to_model_input`)."""
    dwt = [s["dwt"] for s in samples if "dwt" in s]
    img = [s["img"] for s in samples if "img" in s]
    batch = {"keys": [s["key"] for s in samples if "dwt" in s] + [s["key"] for s in samples if "img" in s]}
    if dwt:
        batch["dwt"] = torch.stack(dwt)
    if img:
        batch["img"] = torch.stack(img)
    return batch


def to_model_input(batch: dict, mode: str, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A collated batch -> the model's x0 on `device`: DWT mode (B, 12, h, w) with cA -> 2cA - 1; pixel mode
    (B, 3, H, W) in [-1, 1]. Image-only samples in DWT mode get their DWT here, batched, on the device."""
    parts = []
    if "dwt" in batch:
        parts.append(normalize_bands(batch["dwt"].to(device, non_blocking=True).float()))
    if "img" in batch:
        img = batch["img"].to(device, non_blocking=True).float() / 255
        parts.append(normalize_bands(dwt2(img)) if mode == "dwt" else img * 2 - 1)
    if not parts:
        raise ValueError("empty batch")
    return torch.cat(parts).to(dtype)


# --- bad data --------------------------------------------------------------------------------------------------

class SkipCounter:
    """Counts skipped samples by reason and by shard; warns at most once every `every` seconds (with the totals)."""

    def __init__(self, every: float = 30.0):
        self.counts: Counter = Counter()
        self.shards: Counter = Counter()  # samples lost per shard URL
        self.every, self._last = every, -float("inf")

    def count(self, reason: str, detail: str = "", n: int = 1, shard: str | None = None) -> None:
        """`n` samples lost for `reason` (a lost shard: the samples it did not deliver), in `shard` if known."""
        self.counts[reason] += n
        if shard is not None and n:
            self.shards[shard] += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            log.warning("skipped %s (%s); totals so far: %s", reason, detail[:200], dict(self.counts))

    def total(self) -> int:
        return sum(self.counts.values())
