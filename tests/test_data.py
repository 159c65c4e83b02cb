"""trainer.data.shards (part 1): shard lists, bucket access through webdataset, decoding, flips, device batching."""
import tarfile

import pytest
import torch
import webdataset as wds

from helpers import identity_tree
from pipeline.imaging import max_member_bytes
from pipeline.shard import main as shard_main
from trainer.core.dwt import dwt2
from trainer.data.shards import (collate, decode_sample, flip_dwt, list_shards, register_fsspec_schemes, tar_samples,
                                 to_model_input)

# Stored float16 bands vs the DWT of the decoded JPEG (quality 95, 4:4:4): measured on real faces at most 0.09
# per coefficient and 0.005 on average (docs/performance.md); the model input normalises cA by 2.
JPEG_TOL_MAX, JPEG_TOL_MEAN = 0.4, 0.02


def make_sets(tmp_path, size=64):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=3, size=96)
    for name, extra in (("dwt", []), ("jpg", ["--no-dwt"])):
        shard_main(["folder", "--src", str(src), "--out", str(tmp_path / name), "--size", str(size),
                    "--shard-size", "4", *extra])
    return tmp_path / "dwt", tmp_path / "jpg"


def read_all(url: str) -> list[dict]:
    from webdataset.gopen import gopen

    with gopen(url) as stream:
        return list(tar_samples(stream, url, max_member_bytes(64)))


def test_flip_in_dwt_space_equals_dwt_of_flipped_image():
    x = torch.rand(2, 3, 16, 12, dtype=torch.float64)
    assert torch.allclose(flip_dwt(dwt2(x)), dwt2(x.flip(-1)), atol=1e-12)
    assert torch.allclose(flip_dwt(flip_dwt(dwt2(x))), dwt2(x))


def test_list_shards_from_manifest_and_patterns(tmp_path):
    with_dwt, _ = make_sets(tmp_path)
    shards = list_shards(str(with_dwt))
    assert [s.samples for s in shards] == [4, 2] and shards[0].url.endswith("shard-000000.tar")
    pattern = list_shards(str(with_dwt) + "/shard-{000000..000001}.tar")
    assert [s.url for s in pattern] == [s.url for s in shards] and pattern[0].samples is None


@pytest.mark.parametrize("flip", [False, True])
def test_both_shard_kinds_give_the_same_model_input(tmp_path, flip):
    """Sets with and without dwt.f16 train identically up to JPEG rounding; a batch may mix them."""
    with_dwt, jpg_only = make_sets(tmp_path)
    a = [decode_sample(s, "dwt", flip=flip) for sh in list_shards(str(with_dwt)) for s in read_all(sh.url)]
    b = [decode_sample(s, "dwt", flip=flip) for sh in list_shards(str(jpg_only)) for s in read_all(sh.url)]
    assert all("dwt" in s and s["dwt"].dtype == torch.float16 for s in a) and all("img" in s for s in b)
    xa = to_model_input(collate(a), "dwt")
    xb = to_model_input(collate(b), "dwt")
    assert xa.shape == xb.shape == (6, 12, 32, 32)
    assert collate(a)["keys"] == collate(b)["keys"]
    diff = (xa - xb).abs()
    assert diff.max() < JPEG_TOL_MAX and diff.mean() < JPEG_TOL_MEAN
    mixed = collate(a[:3] + b[3:])
    assert set(mixed) == {"dwt", "img", "keys"}
    assert (to_model_input(mixed, "dwt") - torch.cat([xa[:3], xb[3:]])).abs().max() == 0


def test_pixel_mode_resolution_and_range(tmp_path):
    _, jpg_only = make_sets(tmp_path)
    samples = [decode_sample(s, "pixel", resolution=32) for s in read_all(list_shards(str(jpg_only))[0].url)]
    x = to_model_input(collate(samples), "pixel", dtype=torch.float16)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float16
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.2


def test_a_truncated_shard_yields_its_whole_samples_then_raises(tmp_path):
    """The samples before the cut arrive; the error then ends the shard (the stream counts what it lost)."""
    with_dwt, _ = make_sets(tmp_path)
    url = list_shards(str(with_dwt))[0].url
    data = open(url, "rb").read()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[: len(data) // 2])
    got = []
    with open(bad, "rb") as f, pytest.raises(tarfile.ReadError):
        for sample in tar_samples(f, str(bad), max_member_bytes(64)):
            got.append(sample)
    assert 0 < len(got) < 4 and all(set(s) >= {"jpg", "dwt.f16", "json"} for s in got)


def test_bucket_shards_through_webdataset(tmp_path, s3_server):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=3, size=64)
    shard_main(["folder", "--src", str(src), "--out", "s3://test-bucket/sets/a", "--size", "32",
                "--shard-size", "4"])
    register_fsspec_schemes()
    shards = list_shards("s3://test-bucket/sets/a")
    assert [s.url for s in shards] == ["s3://test-bucket/sets/a/shard-000000.tar",
                                       "s3://test-bucket/sets/a/shard-000001.tar"]
    assert sum(len(read_all(s.url)) for s in shards) == 6
    keys = [s["__key__"] for s in wds.WebDataset([s.url for s in shards], shardshuffle=False, empty_check=False)]
    assert len(keys) == 6 and len(set(keys)) == 6
    with pytest.raises(FileNotFoundError):
        read_all("s3://test-bucket/sets/a/shard-000009.tar")


# --- samples that must never reach collate, and decompression bombs ---------------------------------------------

def _with_size(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """A small image whose header claims w x h: a PNG's IHDR (with its CRC) or a JPEG's SOF0 patched."""
    import struct
    import zlib

    if fmt == "PNG":
        ihdr = b"IHDR" + struct.pack(">II", w, h) + data[24:29]
        return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]
    sof = data.index(b"\xff\xc0")
    return data[:sof + 5] + struct.pack(">HH", h, w) + data[sof + 9:]


def _no_decoding(monkeypatch):
    from PIL import ImageFile

    def load(self):
        raise AssertionError(f"a {self.size} image was decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("fmt,reason", [("PNG", "not an image"), ("JPEG", "too large (decompression bomb)")])
def test_decompression_bombs_are_refused_from_the_header(monkeypatch, fmt, reason):
    """A small PNG named .jpg that would decode to 9500x9500 (the shard format allows JPEG only), and a JPEG whose
    header says 9500x9500: refused with a reason before anything is decoded, whatever the set's crop side."""
    import io
    import warnings

    from PIL import Image

    from trainer.data.shards import BadSample

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format=fmt)
    bomb = _with_size(buf.getvalue(), fmt, 9500, 9500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert Image.open(io.BytesIO(bomb)).size == (9500, 9500) and len(bomb) < 11_000
    _no_decoding(monkeypatch)
    for side in (None, 64):
        with pytest.raises(BadSample) as e:
            decode_sample({"__key__": "k", "jpg": bomb}, "pixel", resolution=16, side=side)
        assert e.value.reason == reason


def test_samples_of_another_size_or_with_bad_bands_are_refused(tmp_path):
    """A dwt.f16 of valid length for a 32 px crop among 64 px samples, bands holding NaN, inf or values outside
    the DWT's range, an image of another size: BadSample with a reason, never a tensor of the wrong shape."""
    import numpy as np

    from pipeline.schema import encode_dwt
    from trainer.data.shards import BadSample

    with_dwt, jpg_only = make_sets(tmp_path)
    dwt_sample = read_all(list_shards(str(with_dwt))[0].url)[0]
    assert decode_sample(dwt_sample, "dwt", side=64)["dwt"].shape == (12, 32, 32)
    small = encode_dwt(np.full((12, 16, 16), 0.25, np.float16))
    bands = np.frombuffer(dwt_sample["dwt.f16"], np.float16).reshape(12, 32, 32).copy()
    cases = {"wrong size": [{**dwt_sample, "dwt.f16": small}]}
    for value in (np.nan, np.inf, -1.5):
        bad = bands.copy()
        bad[4, 3, 3] = value
        cases.setdefault("bad values", []).append({**dwt_sample, "dwt.f16": encode_dwt(bad)})
    jpg_sample = read_all(list_shards(str(jpg_only))[0].url)[0]
    cases["wrong size"].append(jpg_sample)  # a 64 px crop where 128 px ones are due
    for reason, samples in cases.items():
        for sample in samples:
            with pytest.raises(BadSample) as e:
                decode_sample(sample, "dwt", side=64 if "dwt.f16" in sample else 128)
            assert e.value.reason == reason
    assert decode_sample(jpg_sample, "pixel", resolution=16, side=64)["img"].shape == (3, 16, 16)


def test_shards_are_read_as_plain_tars_and_members_capped_from_their_header(tmp_path, monkeypatch):
    """A gzip stream named .tar fails at its first header without being inflated; a member larger than a sample
    can be is not read (its value None) and decode_sample refuses that sample."""
    import gzip
    import io
    import tarfile

    from trainer.data.shards import BadSample, tar_samples

    with_dwt, _ = make_sets(tmp_path)
    plain = open(list_shards(str(with_dwt))[0].url, "rb").read()
    inflated = []
    original = tarfile._Stream._init_read_gz
    monkeypatch.setattr(tarfile._Stream, "_init_read_gz", lambda self: inflated.append(1) or original(self))
    with pytest.raises(tarfile.ReadError):
        list(tar_samples(io.BytesIO(gzip.compress(plain)), "x.tar", 1 << 30))
    assert inflated == []
    samples = list(tar_samples(io.BytesIO(plain), "x.tar", 10_000))  # the bands (24,576 bytes) are over the cap
    assert len(samples) == 4 and all(s["dwt.f16"] is None and s["jpg"] is not None for s in samples)
    with pytest.raises(BadSample, match="oversized member"):
        decode_sample(samples[0], "dwt")
