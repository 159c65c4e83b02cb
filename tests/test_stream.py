"""trainer.data.stream: exact epochs across ranks x workers, determinism, mixing weights, exact resume."""
import itertools
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import identity_tree
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
