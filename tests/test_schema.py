"""pipeline.schema: key encoding (webdataset-safe, reversible, unique) and the dwt.f16 codec; how readers group
members into samples."""
import numpy as np
import pytest

from pipeline.reader import group_by_key, split_member
from pipeline.schema import decode_dwt, decode_key, encode_dwt, encode_key


@pytest.mark.parametrize("path,key", [
    ("n000002/0001_01.jpg", "n000002%2F0001_01"),
    ("a.b/c d.e.png", "a%2Eb%2Fc%20d%2Ee"),
    ("x%y/z.webp", "x%25y%2Fz"),
    ("Zoë/img(1).jpg", "Zo%C3%AB%2Fimg(1)"),
    ("noext", "noext"),
])
def test_keys_are_webdataset_safe_and_reversible(path, key):
    assert encode_key(path) == key
    assert "." not in key and "/" not in key
    assert decode_key(key) == path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    assert split_member(f"{key}.dwt.f16") == (key, "dwt.f16")  # how readers split a member name


def test_distinct_paths_give_distinct_keys():
    paths = ["a/b.jpg", "a_b.jpg", "a%2Fb.jpg", "a.b.jpg", "a/b/c.jpg", "a%b.jpg"]
    assert len({encode_key(p) for p in paths}) == len(paths)


def test_dwt_codec_roundtrip_and_size_check():
    bands = np.random.default_rng(0).normal(size=(12, 4, 4)).astype(np.float32)
    data = encode_dwt(bands)
    assert len(data) == 12 * 4 * 4 * 2
    assert np.array_equal(decode_dwt(data, size=8), bands.astype("<f2"))
    with pytest.raises(ValueError, match="expected"):
        decode_dwt(data, size=256)


def test_group_by_key_groups_consecutive_members():
    members = [("a.jpg", b"1"), ("a.dwt.f16", b"2"), ("a.json", b"3"), ("d/b.jpg", b"4"), ("d/b.cls", b"5"),
               ("a.jpg", b"6")]  # a key seen again later is a new sample: grouping follows tar order
    assert list(group_by_key(members)) == [
        {"__key__": "a", "jpg": b"1", "dwt.f16": b"2", "json": b"3"},
        {"__key__": "d/b", "jpg": b"4", "cls": b"5"},
        {"__key__": "a", "jpg": b"6"},
    ]
    assert list(group_by_key([])) == []
