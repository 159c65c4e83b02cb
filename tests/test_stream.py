"""trainer.data.stream: exact epochs across ranks x workers, determinism, mixing weights, exact resume."""
import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import identity_tree, jpeg_bytes
from pipeline.shard import main as shard_main
from trainer.data.stream import ShardStream, StreamConfig, StreamPosition


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two small shard sets: A (24 images, 6 shards of 4) and B (8 images, 2 shards), 32 px, jpg only."""
    root = tmp_path_factory.mktemp("stream")
    out = {}
    for name, ids, seed in (("A", 6, 0), ("B", 2, 1)):
        identity_tree(root / f"src{name}" / name.lower(), identities=ids, per_identity=4, size=48, seed=seed)
        shard_main(["folder", "--src", str(root / f"src{name}"), "--out", str(root / name), "--size", "32",
                    "--no-dwt", "--shard-size", "4"])
        out[name] = str(root / name)
    return out


def batches(cfg, rank=0, world=1, workers=0, start=None, n=None):
    loader = DataLoader(ShardStream(cfg, rank, world, workers, start), batch_size=None, num_workers=workers)
    return list(itertools.islice(loader, n))


def keys(bs):
    return [k for b in bs for k in b["keys"]]


@pytest.mark.slow  # DataLoader worker processes
@pytest.mark.parametrize("source,shards_per_chunk", [("A", 1), ("A", 2), ("B", 1)])
def test_exact_epochs_two_ranks_two_workers(sets, source, shards_per_chunk):
    """Every sample exactly once per epoch across 2 ranks x 2 workers: A has 6 shards for 4 slots (split by
    shard), B has 2 (fewer than the slots: split by sample)."""
    cfg = StreamConfig((sets[source],), mode="pixel", order="exact", batch_size=1,
                       shards_per_chunk=shards_per_chunk, buffer=3, seed=5)
    seen = defaultdict(Counter)
    for rank in (0, 1):
        for b in batches(cfg, rank, 2, workers=2, n=40):  # 20 samples per worker: at least two epochs each
            seen[b["epoch"]].update(b["keys"])
    expected = _keys_of(sets[source])
    for epoch in (0, 1):
        assert set(seen[epoch]) == expected and set(seen[epoch].values()) == {1}, (epoch, seen[epoch])


def test_same_seed_same_stream_other_seed_other_stream(sets):
    cfg = StreamConfig((sets["A"],), mode="pixel", batch_size=4, seed=1)
    a, b = batches(cfg, n=6), batches(cfg, n=6)
    assert keys(a) == keys(b) and all(torch.equal(x["img"], y["img"]) for x, y in zip(a, b))
    assert keys(a) != keys(batches(StreamConfig((sets["A"],), mode="pixel", batch_size=4, seed=2), n=6))
    plain = batches(StreamConfig((sets["A"],), mode="pixel", batch_size=4, seed=1, flip=False), n=6)
    assert keys(plain) == keys(a)  # flips do not change the order
    same = sum(torch.equal(x["img"][i], y["img"][i]) for x, y in zip(a, plain) for i in range(4))
    mirrored = sum(torch.equal(x["img"][i], y["img"][i].flip(-1)) for x, y in zip(a, plain) for i in range(4))
    assert same + mirrored == 24 and 4 < mirrored < 20


def test_resampled_mixing_weights(sets):
    cfg = StreamConfig((sets["A"], sets["B"]), weights=(1.0, 3.0), mode="pixel", batch_size=8, seed=3,
                       shards_per_chunk=2)
    urls = [u for b in batches(cfg, n=60) for u in b["keys"]]
    b_keys = _keys_of(sets["B"])
    share = sum(k in b_keys for k in urls) / len(urls)
    assert b_keys and 0.55 < share < 0.95  # B drawn 3:1 (by images alone it would be 8 of 32)


def _keys_of(path):
    from pipeline.reader import iter_samples

    m = json.loads((Path(path) / "manifest.json").read_text())
    return {s["__key__"] for e in m["shards"] for s in iter_samples((Path(path) / e["name"]).read_bytes())}


@pytest.mark.parametrize("order,workers", [pytest.param("resampled", 2, marks=pytest.mark.slow),  # worker processes
                                           pytest.param("exact", 2, marks=pytest.mark.slow), ("exact", 0)])
def test_resume_continues_the_stream_exactly(sets, order, workers):
    cfg = StreamConfig((sets["A"],), mode="pixel", order=order, batch_size=3, buffer=4, seed=9)
    full = batches(cfg, workers=workers, n=14)
    pos = StreamPosition()
    for b in batches(cfg, workers=workers, n=5):  # "train" 5 batches, checkpoint, die
        pos.update(b)
    pos = StreamPosition.from_state_dict(pos.state_dict())  # through the checkpoint's JSON-able form
    resumed = batches(cfg, workers=workers, start=pos, n=9)
    assert keys(resumed) == keys(full[5:])
    assert all(torch.equal(a["img"], b["img"]) for a, b in zip(resumed, full[5:]))  # same flips too


def test_bad_config_is_refused(sets):
    with pytest.raises(ValueError, match="weights"):
        StreamConfig((sets["A"],), weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="order"):
        StreamConfig((sets["A"],), order="shuffled")


def test_shard_cut_between_samples_is_counted_as_short(tmp_path, sets):
    """A local tar cut exactly at a sample boundary is a valid, shorter tar: the manifest's count exposes it."""
    import shutil
    import tarfile

    copy = tmp_path / "A"
    shutil.copytree(sets["A"], copy)
    shard = sorted(copy.glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys_in_order = [m.name.split(".")[0] for m in members]
    second = keys_in_order.index(next(k for k in keys_in_order if k != keys_in_order[0]))
    shard.write_bytes(shard.read_bytes()[:members[second].offset])  # only the first sample is left
    cfg = StreamConfig((str(copy),), mode="pixel", order="exact", batch_size=1, buffer=3, seed=5)
    got = batches(cfg, n=21)  # one epoch: 24 samples minus the 3 cut off
    assert len(set(keys(got))) == 21 and {b["epoch"] for b in got} == {0}
    assert got[-1]["skipped"] == {"short shard": 3}  # the samples lost, not the shard
    assert got[-1]["lost"] == {str(shard): 3}


# --- bad samples, lost shards, the skip budget, the buffer's memory -------------------------------------------------

def _tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _members(shard):
    import tarfile

    with tarfile.open(shard) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.fixture(scope="module")
def dwt_set(tmp_path_factory):
    """8 synthetic faces as 32 px crops with dwt.f16, one shard."""
    root = tmp_path_factory.mktemp("dwtset")
    identity_tree(root / "src", identities=2, per_identity=4, size=48, seed=4)
    shard_main(["folder", "--src", str(root / "src"), "--out", str(root / "set"), "--size", "32", "--shard-size", "8"])
    return root / "set"


def test_bad_samples_never_reach_collate_nor_stop_a_resumed_stream(tmp_path, dwt_set):
    """In DWT mode at 32 px, among good samples: bands of valid length for a 16 px crop, bands with a NaN, an
    image-only sample of another size, a PNG named .jpg, a member larger than a sample can be. Each is skipped
    and counted by reason; the batches hold only good samples, also when resuming just before them."""
    import io

    import numpy as np
    from PIL import Image

    good = _members(next(dwt_set.glob("*.tar")))
    bands = np.frombuffer(next(d for n, d in good if n.endswith(".dwt.f16")), np.float16).copy()
    nan = bands.copy()
    nan[7] = np.nan
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    bad = [("b1.dwt.f16", bytes(12 * 8 * 8 * 2)), ("b1.jpg", good[0][1]), ("b2.dwt.f16", nan.tobytes()),
           ("b3.jpg", jpeg_bytes(np.zeros((16, 16, 3), np.uint8))), ("b4.jpg", png.getvalue()),
           ("b5.jpg", good[0][1]), ("b5.json", b" " * (2 << 20))]
    two = 2 * len(good) // 8
    shard = _tar(tmp_path / "mixed.tar", good[:two] + bad + good[two:])  # after the first two samples
    cfg = StreamConfig((str(shard),), mode="dwt", resolution=32, order="exact", batch_size=2, buffer=1,
                       flip=False)
    full = batches(cfg, n=4)
    assert len(set(keys(full))) == 8 and all(b["dwt"].shape == (2, 12, 16, 16) for b in full)
    assert full[1]["skipped"] == {"wrong size": 2, "bad values": 1, "not an image": 1, "oversized member": 1}
    assert full[1]["lost"] == {str(shard): 5}
    pos = StreamPosition()
    pos.update(full[0])  # a checkpoint taken just before the bad samples: the resume meets them again
    assert keys(batches(cfg, start=pos, n=3)) == keys(full[1:])


def _damaged_copy(tmp_path, source, damage):
    import shutil

    copy = tmp_path / Path(source).name
    shutil.copytree(source, copy)
    names = [e["name"] for e in json.loads((copy / "manifest.json").read_text())["shards"]]
    damage(copy / names[0])
    return copy, str(copy / names[0])


def _cut_in_second_sample(shard):
    import tarfile

    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    shard.write_bytes(shard.read_bytes()[:second.offset_data + 10])


def _gzip(shard):
    import gzip

    shard.write_bytes(gzip.compress(shard.read_bytes()))


@pytest.mark.parametrize("damage,lost", [(Path.unlink, 4), (_cut_in_second_sample, 3), (_gzip, 4)])
def test_a_lost_shard_counts_the_samples_it_lost(tmp_path, sets, damage, lost):
    """A missing shard, one cut inside its 2nd sample, a gzip stream named .tar (refused, not inflated): the
    epoch is short by exactly the samples lost, and the count says so (the manifest's count minus those read)."""
    copy, url = _damaged_copy(tmp_path, sets["A"], damage)
    cfg = StreamConfig((str(copy),), mode="pixel", order="exact", batch_size=1, buffer=3, seed=5)
    got = batches(cfg, n=24 - lost)
    assert len(set(keys(got))) == 24 - lost and {b["epoch"] for b in got} == {0}
    assert got[-1]["skipped"] == {"unreadable shard": lost} and got[-1]["lost"] == {url: lost}


def test_split_by_sample_counts_each_slot_its_share_of_a_lost_shard(tmp_path, sets):
    """B has 2 shards for 3 ranks (split by sample): every slot meets the missing shard, each counts only the
    samples that were its own, so the ranks' counts add up to the shard's 4 samples."""
    copy, _ = _damaged_copy(tmp_path, sets["B"], Path.unlink)
    from trainer.data.shards import SkipCounter

    cfg = StreamConfig((str(copy),), mode="pixel", order="exact", batch_size=1, buffer=3, seed=5)
    counts, read = [], 0
    for rank in range(3):  # the whole of epoch 0 (one chunk) of each rank's slot
        stream, skips = ShardStream(cfg, rank, 3), SkipCounter()
        read += len(list(stream._chunk_samples(rank, 0, stream._chunk_plan(rank, 3, 0), skips)))
        counts.append(skips.counts["unreadable shard"])
    assert read == 4 and sum(counts) == 4 and max(counts) < 4, counts


def test_the_skip_budget_and_its_message():
    from trainer.data.stream import skip_message, too_many_skipped

    assert not too_many_skipped(1000, 0, 0.01, 1000)        # one lost shard alone, at the start of a run
    assert too_many_skipped(1001, 50_000, 0.01, 1000)        # more than a shard's worth and over 1%
    assert not too_many_skipped(1001, 200_000, 0.01, 1000)   # under 1%
    assert too_many_skipped(1, 10**9, 0.0, 1000)             # 0: any loss stops
    assert not too_many_skipped(10**6, 0, 1.0, 1000)         # 1: never
    shards = Counter({f"s3://b/set/shard-{i:06d}.tar": 10 + i for i in range(7)})
    msg = skip_message(76, 924, 0.01, Counter({"unreadable shard": 76}), shards)
    assert msg.startswith("error: 76 of 1000 samples read were skipped (7.6%), over data.max_skip_fraction 0.01")
    assert "s3://b/set/shard-000006.tar (16)" in msg and "and 2 more" in msg and "\n" not in msg


def test_max_skip_fraction_is_range_checked():
    from trainer.train.config import DataConfig

    assert DataConfig().max_skip_fraction == 0.01
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"data.max_skip_fraction .*\[0, 1\]"):
            DataConfig(max_skip_fraction=bad)


def test_shuffle_buffer_memory_estimate_and_warning(dwt_set, sets):
    """Bytes a buffered sample holds come from the manifest (dwt.f16 at 32 px: 6,144 bytes of bands + JPEG +
    headers); the warning names the buffer that fits a quarter of the memory."""
    from trainer.data.stream import buffer_warning

    per_sample = ShardStream(StreamConfig((str(dwt_set),), mode="dwt")).sample_bytes()
    assert 6 * 32 * 32 < per_sample < 6 * 32 * 32 + 8000
    assert ShardStream(StreamConfig((sets["A"],), mode="pixel")).sample_bytes() < 6 * 32 * 32  # jpg only
    # the figures: 415 KB samples, buffer 1000, 8 workers x 8 ranks = 26.6 GB
    assert buffer_warning(415e3, 1000, 8, 8, 2 << 40) is None  # a 2 TiB node
    msg = buffer_warning(415e3, 1000, 8, 8, 64 << 30)
    assert "~26.6 GB of shuffle buffers" in msg and "set data.buffer=646 " in msg
    assert buffer_warning(415e3, 1000, 0, 1, 1 << 30) is not None  # no workers: the rank's own buffer
