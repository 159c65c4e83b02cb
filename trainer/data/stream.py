"""The training stream: shards -> per-(rank, worker) sample streams -> micro-batches, resumable exactly.

Slots. With `world` ranks and `W` DataLoader workers per rank there are S = world * W slots; logical worker w of
rank r is slot r * W + w. Each slot reads a deterministic sequence of *chunks*; chunk c is a pure function of
(seed, slot, c):
- order "exact" (fine-tuning sets, evaluation): epoch e permutes all shards with seed (seed, e); slot s takes
  shards s, s+S, s+2S, ... of that order, `shards_per_chunk` at a time. Every sample of the set is seen exactly once
  per epoch across all slots. A set with fewer shards than slots is split by sample instead (every slot reads the
  epoch's shards and keeps samples i with i % S == s): still exactly once, at the cost of reading more.
- order "resampled" (pre-training): each chunk draws `shards_per_chunk` shards with replacement, a source first
  (by the mixing weights), then a shard of it; infinite, never in lockstep across slots.
Inside a chunk the shards are read interleaved through a shuffle buffer that is drained at the chunk's end, so a
chunk's sample order is also a pure function of (seed, slot, c): resuming needs only (chunk, samples taken) per
slot, not the buffer. Flips are drawn per sample from the chunk's seed.

Position. Each batch carries `pos` = (logical worker, chunk, samples of that chunk consumed after this batch).
`StreamPosition.update(batch)` after each trained batch records it, with the number of batches consumed; a
resumed stream starts every slot at its recorded place and rotates the workers so that torch's round-robin
delivers the same next batch (batch i comes from logical worker i mod W). Replay cost: at most one chunk per slot.

Bad data never stops a worker: a sample that cannot be decoded, is of another size than its set's crops (another
than the model's in DWT mode: bands are never resized) or holds bad values is skipped and counted by reason, before
`collate` sees it; a shard that cannot be read or ends early counts the samples it lost (its manifest's count minus
those read; 1 for a pattern's shard, whose count is unknown). Each batch carries its worker's running counts by
reason (`skipped`) and by shard (`lost`); the loop stops the run past `data.max_skip_fraction` (`too_many_skipped`).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.imaging import MAX_CROP_SIDE, max_member_bytes
from trainer.core.settings import INPUT_MODES, ORDERS
from trainer.data.shards import (RETRIES, BadSample, SkipCounter, collate, decode_sample, list_shards,
                                 register_fsspec_schemes, tar_samples)

__all__ = ["StreamConfig", "StreamPosition", "ShardStream", "DataCounts", "too_many_skipped", "buffer_warning"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    sources: tuple[str, ...]              # shard sets (folders/URLs with manifest.json), brace patterns, tars
    weights: tuple[float, ...] | None = None  # mixing weights of the sources (resampled order)
    mode: str = "dwt"                     # model input: "dwt" or "pixel"
    # side of the model input: pixel mode resizes crops to it; DWT mode skips samples of another side (bands are
    # never resized). None: each set's manifest decides (a pattern's first sample, where none says)
    resolution: int | None = None
    order: str = "resampled"
    batch_size: int = 32                  # per rank (the micro-batch)
    shards_per_chunk: int = 4
    buffer: int = 1000                    # shuffle buffer, in samples
    flip: bool = True
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources:
            raise ValueError("no data sources: give at least one shard set")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.sources) or min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"weights {self.weights} must be one non-negative number per source "
                                 f"({len(self.sources)}), not all zero")
        if self.mode not in INPUT_MODES:
            raise ValueError(f"unknown input mode {self.mode!r}; choose one of {INPUT_MODES}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown stream order {self.order!r}; choose one of {ORDERS}")
        if self.batch_size < 1 or self.shards_per_chunk < 1 or self.buffer < 1:
            raise ValueError("batch_size, shards_per_chunk and buffer must be >= 1")

    @classmethod
    def from_experiment(cls, cfg, seed: int | None = None) -> "StreamConfig":
        """The stream of an ExperimentConfig (data section, model input, micro-batch); `seed` default train.seed."""
        m, d = cfg.model, cfg.data
        return cls(d.sources, d.weights, m.input, m.image_size, d.order,
                   cfg.train.micro_batch, d.shards_per_chunk, d.buffer, d.flip,
                   cfg.train.seed if seed is None else seed)


@dataclass
class StreamPosition:
    """Where each logical worker of one rank stands: {worker: (chunk, samples consumed)}, and batches consumed."""
    chunks: dict[int, tuple[int, int]] = field(default_factory=dict)
    batches: int = 0

    def update(self, batch: dict) -> None:
        worker, chunk, taken = batch["pos"]
        self.chunks[worker] = (chunk, taken)
        self.batches += 1

    def state_dict(self) -> dict:
        return {"chunks": {str(k): list(v) for k, v in self.chunks.items()}, "batches": self.batches}

    @classmethod
    def from_state_dict(cls, d: dict) -> "StreamPosition":
        return cls({int(k): (int(v[0]), int(v[1])) for k, v in d["chunks"].items()}, int(d["batches"]))


class DataCounts:
    """Skipped samples and bucket retries of one rank, over all its DataLoader workers. Each batch carries its
    worker's running totals since it started (`skipped`: by reason; `lost`: by shard; `retries`: by protocol;
    retries of the main process before the workers started, e.g. reading manifests, are not in them); the rank's
    figure is the sum of each worker's latest totals, and `totals()` is what the loop all-reduces into the run's
    figure."""

    def __init__(self):
        self.latest: dict[int, tuple[dict, dict, int]] = {}

    def update(self, batch: dict) -> None:
        self.latest[batch["pos"][0]] = (batch.get("skipped", {}), batch.get("lost", {}),
                                        sum(batch.get("retries", {}).values()))

    def totals(self) -> tuple[int, int]:
        """(skipped samples, bucket retries) summed over this rank's workers."""
        return (sum(sum(s.values()) for s, _, _ in self.latest.values()),
                sum(r for _, _, r in self.latest.values()))

    def by_reason_and_shard(self) -> tuple[Counter, Counter]:
        """Skipped samples of this rank by reason and by shard URL."""
        reasons, shards = Counter(), Counter()
        for s, lost, _ in self.latest.values():
            reasons.update(s)
            shards.update(lost)
        return reasons, shards


def too_many_skipped(skipped: int, trained: int, max_fraction: float, one_shard: int) -> bool:
    """Whether the samples skipped exceed `max_fraction` of those read (skipped + trained) and, unless the
    fraction is 0 (any loss stops), one shard's worth (`one_shard`): a single lost shard early in a run never
    stops it by itself."""
    return skipped > max_fraction * (skipped + trained) and (max_fraction == 0 or skipped > one_shard)


def skip_message(skipped: int, trained: int, max_fraction: float, reasons: Counter, shards: Counter,
                 saved: str = "") -> str:
    """The one line that stops a run with too many skipped samples, naming the shards that lost them (and the
    checkpoint `saved`, if any)."""
    named = ", ".join(f"{url} ({n})" for url, n in shards.most_common(5))
    more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
    checkpoint = f"; checkpoint {saved} saved" if saved else ""
    return (f"error: {skipped} of {skipped + trained} samples read were skipped ({skipped / (skipped + trained):.1%}), "
            f"over data.max_skip_fraction {max_fraction:g} ({dict(reasons)}); shards that lost samples: "
            f"{named or 'none named'}{more}{checkpoint}: repair or remove them (python -m pipeline.verify SET names "
            f"the damaged ones) or raise data.max_skip_fraction, then run the same command again")


def buffer_warning(sample_bytes: float, buffer: int, workers: int, local_ranks: int, memory: int) -> str | None:
    """A word when the shuffle buffers of this machine's loader processes (one per worker, or the rank itself
    with 0 workers) would take more than a quarter of its `memory` bytes; names a `data.buffer` that fits."""
    readers = max(1, workers) * local_ranks
    need = sample_bytes * buffer * readers
    if need <= memory / 4:
        return None
    fit = max(1, int(memory / 4 / (sample_bytes * readers)))
    return (f"data.buffer {buffer} samples x ~{sample_bytes / 1e3:.0f} KB a sample x {readers} loader processes "
            f"(data.workers {workers} x {local_ranks} ranks) = ~{need / 1e9:.1f} GB of shuffle buffers on a machine "
            f"with {memory / 1e9:.1f} GB: set data.buffer={fit} (a quarter of the memory) or fewer data.workers")


class ShardStream(IterableDataset):
    """Infinite micro-batches for one rank. Use with `DataLoader(stream, batch_size=None, num_workers=W)` and the
    same W given here."""

    def __init__(self, cfg: StreamConfig, rank: int = 0, world: int = 1, num_workers: int = 0,
                 start: StreamPosition | None = None):
        super().__init__()
        self.cfg, self.rank, self.world = cfg, rank, world
        self.W = max(1, num_workers)
        self.start = start or StreamPosition()
        self.sources = [list_shards(s) for s in cfg.sources]
        for src, shards in zip(cfg.sources, self.sources):
            if not shards:
                raise ValueError(f"data source {src} has no shards")
        self.all_shards = [sh for shards in self.sources for sh in shards]
        if rank == 0:  # once per run, not per sample or worker: the manifests say what every sample would be
            for src, size in self.resized_sources():
                log.warning("data source %s holds %d px crops; this pixel-mode model is %d px: every sample is "
                            "resized from %d to %d px (set model.image_size: %d, or shard the set at --size %d)",
                            src, size, cfg.resolution, size, cfg.resolution, size, cfg.resolution)

    def resized_sources(self) -> list[tuple[str, int]]:
        """(source, crop side) of the sources whose manifest gives another side than the pixel-mode model's."""
        if self.cfg.mode != "pixel" or not self.cfg.resolution:
            return []
        return self.sources_not_at(self.cfg.resolution)

    def sources_not_at(self, side: int) -> list[tuple[str, int]]:
        """(source, crop side) of the sources whose manifest gives a crop side other than `side` (DWT mode cannot
        resize: its bands are the shard's)."""
        sizes = [{sh.size for sh in shards} - {None} for shards in self.sources]
        return [(src, size) for src, found in zip(self.cfg.sources, sizes) for size in sorted(found) if size != side]

    def sample_bytes(self) -> float:
        """Bytes a raw sample holds in the shuffle buffer, at most over the sources: the manifest's bytes per
        sample, or for a pattern that of a sample with `dwt.f16` at the model's side (256 px if unknown)."""
        def per_source(shards):
            if all(sh.bytes and sh.samples for sh in shards):
                return sum(sh.bytes for sh in shards) / max(1, sum(sh.samples for sh in shards))
            side = self.cfg.resolution or shards[0].size or 256
            return 6.5 * side * side  # 12 float16 bands at half the side (6 bytes a pixel) + the JPEG
        return max(per_source(shards) for shards in self.sources)

    def largest_shard(self) -> int:
        """Samples of the largest shard (the manifests'; 1000, the pipeline's default, for patterns)."""
        return max((sh.samples for sh in self.all_shards if sh.samples), default=1000)

    def _side(self, size: int | None) -> int | None:
        """The crop side a sample of a shard whose manifest says `size` must have: in DWT mode the model's
        (bands are never resized), else the manifest's (pixel mode resizes any side to the model's)."""
        return (self.cfg.resolution or size) if self.cfg.mode == "dwt" else size

    # -- which raw samples chunk c of a slot holds, in order --------------------------------------------------

    def _epoch_order(self, epoch: int) -> list:
        perm = np.random.default_rng([self.cfg.seed, epoch, 7]).permutation(len(self.all_shards))
        return [self.all_shards[i] for i in perm]

    def _chunk_plan(self, slot: int, S: int, c: int) -> tuple[list, int | None, int]:
        """(shards to read, sample-split stride or None, epoch) of chunk c."""
        cfg, n = self.cfg, len(self.all_shards)
        if cfg.order == "resampled":
            rng = np.random.default_rng([cfg.seed, slot, c, 0])
            p = np.asarray(cfg.weights or [1.0] * len(self.sources), dtype=np.float64)
            picks = rng.choice(len(self.sources), size=cfg.shards_per_chunk, p=p / p.sum())
            return [self.sources[i][rng.integers(len(self.sources[i]))] for i in picks], None, 0
        if n < S:  # fewer shards than slots: one chunk per epoch, split by sample
            return self._epoch_order(c), S, c
        per_epoch = math.ceil(len(range(slot, n, S)) / cfg.shards_per_chunk)
        epoch, ci = divmod(c, per_epoch)
        mine = self._epoch_order(epoch)[slot::S]
        return mine[ci * cfg.shards_per_chunk:(ci + 1) * cfg.shards_per_chunk], None, epoch

    def _chunk_samples(self, slot: int, c: int, plan: tuple, skips: SkipCounter):
        from webdataset.gopen import gopen

        shards, stride, _ = plan
        rng = np.random.default_rng([self.cfg.seed, slot, c, 1])

        def read(shard, mine=lambda lost: lost):
            """The shard's samples; what it fails to deliver is counted (`mine`: this slot's share of it)."""
            url, n = shard.url, 0
            limit = max_member_bytes(self._side(shard.size) or MAX_CROP_SIDE)
            try:
                with gopen(url) as stream:
                    for sample in tar_samples(stream, url, limit):
                        n += 1
                        sample["__size__"] = shard.size
                        yield sample
            except Exception as e:  # noqa: BLE001 - an unreadable shard is counted, the stream goes on
                lost = 1 if shard.samples is None else max(0, shard.samples - n)
                skips.count("unreadable shard", f"{url}: {e}", mine(lost), url)
                return
            if shard.samples is not None and n < shard.samples:
                # a tar cut exactly between two samples reads as a shorter, valid tar: only the manifest tells
                skips.count("short shard", f"{url}: {n} of its {shard.samples} samples (truncated?)",
                            mine(shard.samples - n), url)

        if stride is not None:  # sample split: every slot walks the same sequence, keeps its residue class
            index = 0

            def mine(lost):  # of the `lost` samples that would have come next, those of this slot
                return len(range((slot - index) % stride, lost, stride))
            for sh in shards:
                for sample in read(sh, mine):
                    if index % stride == slot:
                        yield sample
                    index += 1
            return
        streams, buffer = [read(sh) for sh in shards], []
        while streams:
            i = int(rng.integers(len(streams)))
            try:
                buffer.append(next(streams[i]))
            except StopIteration:
                streams.pop(i)
                continue
            if len(buffer) >= self.cfg.buffer:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    # -- what each slot reads (for `pretrain.py --dry-run`) ----------------------------------------------------

    def assignment(self, slot: int) -> dict:
        """Slot `slot` (= rank * workers + worker) in epoch 0 ("exact": all its shards; "resampled": its first
        chunk, an example of an endless random draw): shard names, and samples where the manifest knows them."""
        S = self.world * self.W
        if self.cfg.order == "resampled":
            shards, stride = self._chunk_plan(slot, S, 0)[:2]
        elif len(self.all_shards) < S:
            shards, stride = self._epoch_order(0), S
        else:
            shards, stride = self._epoch_order(0)[slot::S], None
        known = all(sh.samples is not None for sh in shards)
        samples = sum(sh.samples for sh in shards) if known else None
        if samples is not None and stride is not None:
            samples = len(range(slot, samples, stride))
        return {"slot": slot, "shards": [sh.url.rsplit("/", 1)[-1] for sh in shards], "samples": samples,
                "split_by_sample": stride is not None}

    # -- the iterator ---------------------------------------------------------------------------------------

    def __iter__(self):
        register_fsspec_schemes()
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.W:
            raise RuntimeError(f"ShardStream was built for {self.W} workers but the DataLoader runs "
                               f"{info.num_workers}: pass the same num_workers to both")
        logical = (physical + self.start.batches) % self.W
        slot, S = self.rank * self.W + logical, self.world * self.W
        c, skip = self.start.chunks.get(logical, (0, 0))
        skips, batch, empty = SkipCounter(), [], 0
        uniform, first_side = self.cfg.mode == "dwt" or not self.cfg.resolution, None  # collate stacks sides as read
        inherited = Counter(RETRIES)  # a forked worker starts with its parent's count: report its own retries only
        unsized = self.rank == 0 and self.cfg.mode == "pixel" and any(sh.size is None for sh in self.all_shards)
        on_resize = _warn_once(self.cfg.resolution, self.cfg.sources) if unsized else None  # patterns: no manifest
        while True:
            plan = self._chunk_plan(slot, S, c)
            flips = np.random.default_rng([self.cfg.seed, slot, c, 2])
            taken = good = 0
            for j, raw in enumerate(self._chunk_samples(slot, c, plan, skips)):
                flip = self.cfg.flip and flips.random() < 0.5
                if j < skip:
                    continue
                taken = j + 1
                side = self._side(raw.get("__size__")) or first_side
                try:
                    sample = decode_sample(raw, self.cfg.mode, self.cfg.resolution, flip, on_resize, side)
                except Exception as e:  # noqa: BLE001 - a bad sample is counted and skipped, never raised
                    reason = e.reason if isinstance(e, BadSample) else "corrupt sample"
                    skips.count(reason, f"{raw.get('__url__')}: {raw.get('__key__')}: {e}", 1, raw.get("__url__"))
                    continue
                if side is None and uniform:  # nothing says the side: the worker's first sample sets it
                    first_side = sample["dwt"].shape[-1] * 2 if "dwt" in sample else sample["img"].shape[-1]
                batch.append(sample)
                good += 1
                if len(batch) == self.cfg.batch_size:
                    out = collate(batch)
                    out["pos"] = (logical, c, taken)
                    out["epoch"] = plan[2]
                    out["skipped"] = dict(skips.counts)
                    out["lost"] = dict(skips.shards)
                    out["retries"] = dict(RETRIES - inherited)  # bucket retries of this worker so far
                    yield out
                    batch = []
            empty = empty + 1 if good == 0 and skip == 0 else 0
            if empty >= 8:  # never spin silently on unreadable data
                raise RuntimeError(f"rank {self.rank} worker {logical}: no usable sample in 8 chunks in a row "
                                   f"(skipped so far: {dict(skips.counts)}); check the data sources "
                                   f"{list(self.cfg.sources)}")
            c, skip = c + 1, 0


def _warn_once(resolution: int, sources):
    """decode_sample's `on_resize` for sources without a manifest: one warning per worker process."""
    warned = []

    def on_resize(size):
        if not warned:
            warned.append(size)
            log.warning("data sources %s: a %dx%d crop is resized to this pixel-mode model's %d px (further "
                        "resizes are not reported); set model.image_size or shard at that --size", list(sources),
                        *size, resolution)
    return on_resize
