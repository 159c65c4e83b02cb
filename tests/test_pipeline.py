"""pipeline: bad inputs counted, determinism across workers, corpus layouts, subsets, parts, verify, preview."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import bad_inputs, celebahq_tree, identity_tree, jpeg_bytes, real_faces_folder, vggface2_tree
from pipeline import merge, preview, verify
from pipeline.imaging import face_square, haar_dwt_f16, process_image
from pipeline.reader import iter_samples
from pipeline.schema import decode_dwt, encode_key
from pipeline.shard import main as shard_main
from pipeline.synthetic import synthetic_faces


def shard(*args):
    shard_main([str(a) for a in args])


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def samples(out) -> dict:
    """{key: sample} over every shard of a local set."""
    found = {}
    for entry in manifest(out)["shards"]:
        for s in iter_samples((out / entry["name"]).read_bytes()):
            found[s["__key__"]] = s
    return found


def rgb(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["jpg"])))


def set_files(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_bad_inputs_are_counted_or_handled(tmp_path):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=2)
    cases = bad_inputs(src)
    out = tmp_path / "out"
    shard("folder", "--src", src, "--out", out, "--shard-size", 4, "--max-pixels", 1_000_000)
    m = manifest(out)
    skipped = {x["input"]: x["reason"] for x in m["skipped"]}
    expected_skips = {k: v for k, v in cases.items() if v}
    assert skipped == expected_skips
    got = samples(out)
    handled = [k for k, v in cases.items() if v is None]
    assert {encode_key(k) for k in handled} <= set(got)
    assert m["totals"]["samples"] == len(got) == 4 + len(handled)
    assert m["totals"]["inputs"] == 4 + len(cases) - 1  # the duplicate key never reaches a shard
    assert m["skipped_by_reason"]["duplicate key"] == 1
    # EXIF orientation applied: displayed image is red on top, blue below; the centre square keeps both
    rot = rgb(got[encode_key("odd/rotated.jpg")]).astype(int)
    assert rot[20, 128, 0] > 200 and rot[20, 128, 2] < 60
    assert rot[235, 128, 2] > 200 and rot[235, 128, 0] < 60
    # transparent corner composited over white; 16-bit grey rescaled, not clipped (max 39999/257 = 156)
    assert rgb(got[encode_key("odd/rgba.png")])[5, 5].min() > 245
    deep = rgb(got[encode_key("odd/deep16.png")])
    assert 145 <= deep.max() <= 165
    for key in map(encode_key, handled):
        assert rgb(got[key]).shape == (256, 256, 3)
    # converted modes keep their colours: compare with the RGB source, resized the same way
    face = np.asarray(Image.fromarray(synthetic_faces(1, 200, seed=9)[0]).resize((256, 256), Image.LANCZOS))
    for name, tol in (("cmyk.jpg", 12), ("palette.png", 12), ("dup.jpg", 6)):
        assert np.abs(rgb(got[encode_key(f"odd/{name}")]).astype(int) - face).mean() < tol, name
    grey = rgb(got[encode_key("odd/grey.jpg")]).astype(int)
    assert np.abs(grey[..., 0] - face[..., 0]).mean() < 6 and (grey[..., 0] == grey[..., 2]).all()


def test_crop_geometry_marker_and_edge_padding():
    """A face box selects exactly its square (box_scale 1); where the square leaves the image the edge pixels
    are repeated, never black."""
    img = np.full((400, 400, 3), 128, np.uint8)
    img[180:220, 180:220] = (255, 0, 0)  # marker in the middle of box (170, 170, 60, 60)
    img[:, 380:] = (0, 0, 255)           # a blue right edge
    data = jpeg_bytes(img, quality=98)
    crop = np.asarray(Image.open(io.BytesIO(process_image(data, box=(170, 170, 60, 60), box_scale=1.0).jpg)))
    crop = crop.astype(int)
    assert crop[128, 128, 0] > 220 and crop[128, 128, 1] < 40  # marker centre
    assert abs(crop[10, 10] - 128).max() < 12                  # grey margin around it
    assert crop[60, 128, 0] > 220 and crop[30, 128, 0] < 160   # marker spans 10..50 of 60 px -> 43..213 of 256
    edge = np.asarray(Image.open(io.BytesIO(process_image(data, box=(370, 100, 60, 60), box_scale=1.0).jpg)))
    assert edge[:, 200:, 2].min() > 200 and edge[:, 200:, 0].max() < 60  # columns 400..430: padded blue


def test_dct_scaled_decode_matches_full_decode():
    """A 1600 px JPEG is decoded at 1/4 scale (400 px) before the final LANCZOS to 256: the result must match a
    full-size decode + LANCZOS (same crop) to within JPEG-level differences."""
    big = synthetic_faces(1, 1600, seed=4)[0]
    data = jpeg_bytes(big, quality=95)
    ours = np.asarray(Image.open(io.BytesIO(process_image(data).jpg))).astype(int)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256), Image.LANCZOS)).astype(int)
    assert np.abs(ours - ref).mean() < 2.0
    off = np.asarray(Image.open(io.BytesIO(process_image(data, box=(500, 400, 500, 600)).jpg))).astype(int)
    side = 1.3 * 600
    l, t = 750 - side / 2, 700 - side / 2
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").crop((round(l), round(t), round(l + side),
                                                                        round(t + side))).resize((256, 256)))
    assert np.abs(off - ref.astype(int)).mean() < 3.0


def test_pipeline_dwt_equals_pywt():
    import pywt

    crop = synthetic_faces(1, 64, seed=5)[0]
    x = crop.astype(np.float64) / 255
    ref = np.concatenate([np.stack(b) for b in zip(*[
        (lambda c: (c[0], *c[1]))(pywt.dwt2(x[..., ch], "haar")) for ch in range(3)])])  # [cA RGB, cH RGB, ...]
    assert np.array_equal(haar_dwt_f16(crop), ref.astype(np.float16))


def test_strict_stops_at_the_first_bad_input(tmp_path):
    src = identity_tree(tmp_path / "src", identities=1, per_identity=2)
    (src / "id000" / "broken.jpg").write_bytes(b"")
    with pytest.raises(SystemExit, match="broken.jpg: empty file"):
        shard("folder", "--src", src, "--out", tmp_path / "out", "--strict")


@pytest.mark.slow  # a worker pool
def test_byte_identical_whatever_workers(tmp_path):
    src = identity_tree(tmp_path / "src", identities=3, per_identity=3)
    shard("folder", "--src", src, "--out", tmp_path / "a", "--shard-size", 2, "--workers", 1)
    shard("folder", "--src", src, "--out", tmp_path / "b", "--shard-size", 2, "--workers", 2)
    a, b = set_files(tmp_path / "a"), set_files(tmp_path / "b")
    assert len(a) == 1 + 5 and a == b  # 9 images in 5 shards + manifest
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
        keys = [m.name.split(".")[0] for m in members]
        assert keys == sorted(keys)


def test_sample_contents_match_the_format(tmp_path):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=1)
    shard("folder", "--src", src, "--out", tmp_path / "out")
    s = samples(tmp_path / "out")[encode_key("id001/img_00.jpg")]
    assert set(s) == {"__key__", "jpg", "dwt.f16", "json", "cls"}
    assert s["cls"] == b"1"
    meta = json.loads(s["json"])
    assert meta["source"] == "id001/img_00.jpg" and meta["identity"] == "id001"
    assert meta["width"] == meta["height"] == 160 and meta["crop"] == [0, 0, 160, 160]
    assert len(meta["sha256"]) == 64 and meta["scale"] == pytest.approx(1.6)
    dwt = decode_dwt(s["dwt.f16"]).astype(np.float32)
    assert dwt.shape == (12, 128, 128)
    cA = dwt[:3]  # approximation = (a+b+c+d)/2 of the [0,1] crop: twice the 2x2 mean
    img = rgb(s).astype(np.float32) / 255
    mean2x2 = img.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    assert np.abs(cA - 2 * mean2x2).mean() < 0.01


def test_vggface2_layout_boxes_and_identities(tmp_path):
    src = vggface2_tree(tmp_path / "vgg")
    out = tmp_path / "out"
    shard("vggface2", "--src", src, "--out", out, "--split", "train")
    m = manifest(out)
    got = samples(out)
    assert m["skipped_by_reason"] == {"box outside image": 1, "malformed CSV row": 3}
    assert m["totals"]["box_fallback"] == 2 and m["totals"]["samples"] == 5
    first = json.loads(got[encode_key("n000001/0001_01")]["json"])
    assert first["box"] == [60, 50, 80, 100]
    assert first["crop"] == pytest.approx(list(face_square((60, 50, 80, 100), 1.3)))  # side 130 around the box
    assert first["identity"] == "Doe, Jane" and first["source"] == "train/n000001/0001_01.jpg"
    assert got[encode_key("n000002/0001_01")]["cls"] == b"1"
    assert json.loads(got[encode_key("n000002/0003_01")]["json"])["box_fallback"] is True
    padded = rgb(got[encode_key("n000001/0002_01")])  # box runs past the bottom-right corner: edge-padded
    assert padded.shape == (256, 256, 3)
    assert m["source_notes"]["identities"] == 2 and m["source_notes"]["identity_names"] == 2
    (src / "bb_landmark" / "loose_bb_train.csv").unlink()
    with pytest.raises(SystemExit, match="--no-bbox"):
        shard("vggface2", "--src", src, "--out", tmp_path / "nobox")
    shard("vggface2", "--src", src, "--out", tmp_path / "nobox", "--no-bbox")
    assert manifest(tmp_path / "nobox")["totals"] == {**manifest(tmp_path / "nobox")["totals"], "samples": 6,
                                                        "box_fallback": 0}


def test_sliver_box_is_skipped_not_fatal(tmp_path):
    """A square that touches the image by less than a pixel after rounding is 'box outside image'."""
    data = jpeg_bytes(synthetic_faces(1, 400)[0])
    from pipeline.imaging import BadInput

    with pytest.raises(BadInput, match="box outside image"):
        process_image(data, box=(-45.7, 10, 40, 40))


def test_unreadable_folder_is_counted(tmp_path, monkeypatch):
    src = identity_tree(tmp_path / "src", identities=3, per_identity=2, size=64)
    real_scandir = os.scandir

    def flaky(path="."):
        if str(path).endswith("id001"):
            raise OSError(5, "Input/output error", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", flaky)
    shard("folder", "--src", src, "--out", tmp_path / "out", "--no-dwt")
    m = manifest(tmp_path / "out")
    assert m["totals"]["samples"] == 4
    assert [(x["input"], x["reason"]) for x in m["skipped"]] == [("id001/", "unreadable file")]


@pytest.mark.parametrize("flags,message", [(["--count", "0"], "--count 0"), (["--limit", "-2"], "--limit -2"),
                                           (["--fraction", "1.5"], "--fraction")])
def test_bad_numbers_are_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        shard("folder", "--src", tmp_path, "--out", tmp_path / "o", *flags)
    assert message in capsys.readouterr().err


def test_celebahq_official_partition(tmp_path):
    src = celebahq_tree(tmp_path / "hq")
    keys = {}
    for split in ("train", "val", "test", "all"):
        shard("celebahq", "--src", src, "--out", tmp_path / split, "--split", split, "--no-dwt")
        keys[split] = sorted(samples(tmp_path / split))
    assert keys["train"] == ["0", "1"] and keys["val"] == ["2", "3"] and keys["test"] == ["4", "5"]
    assert len(keys["all"]) == 6
    (src / "list_eval_partition.txt").unlink()
    with pytest.raises(SystemExit, match="list_eval_partition.txt"):
        shard("celebahq", "--src", src, "--out", tmp_path / "x", "--split", "train")


def test_deterministic_subsets(tmp_path):
    src = identity_tree(tmp_path / "src", identities=4, per_identity=3, size=64)

    def keys(*flags, name):
        shard("folder", "--src", src, "--out", tmp_path / name, "--no-dwt", *flags)
        return sorted(samples(tmp_path / name))

    a = keys("--fraction", 0.5, "--seed", 1, name="a")
    assert len(a) == 6
    assert keys("--fraction", 0.5, "--seed", 1, name="b") == a
    assert keys("--fraction", 0.5, "--seed", 2, name="c") != a
    by_id = keys("--fraction", 0.5, "--seed", 1, "--subset-by", "identity", name="d")
    assert len(by_id) == 6 and len({k.split("%2F")[0] for k in by_id}) == 2  # two whole identities
    assert len(keys("--count", 5, name="e")) == 5


def test_parts_then_merge_equal_a_single_job(tmp_path, capsys):
    src = identity_tree(tmp_path / "src", identities=3, per_identity=3, size=64)
    common = ["folder", "--src", src, "--shard-size", 2, "--no-dwt"]
    shard(*common, "--out", tmp_path / "single")
    shard(*common, "--out", tmp_path / "parts", "--part", "0/2")
    assert not (tmp_path / "parts" / "manifest.json").exists()
    with pytest.raises(SystemExit) as e:
        merge.main([str(tmp_path / "parts")])
    assert e.value.code == 1 and "not complete" in capsys.readouterr().err
    shard(*common, "--out", tmp_path / "parts", "--part", "1/2")  # the last part writes the manifest
    assert set_files(tmp_path / "parts") == set_files(tmp_path / "single")
    (tmp_path / "parts" / "manifest.json").unlink()
    merge.main([str(tmp_path / "parts")])
    assert set_files(tmp_path / "parts") == set_files(tmp_path / "single")


def test_rerun_skips_complete_shards_and_refuses_other_flags(tmp_path, capsys):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=2, size=64)
    out = tmp_path / "out"
    shard("folder", "--src", src, "--out", out, "--shard-size", 2)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    shard("folder", "--src", src, "--out", out, "--shard-size", 2)
    assert "2 already complete" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    with pytest.raises(SystemExit, match="other inputs, flags or software versions"):
        shard("folder", "--src", src, "--out", out, "--shard-size", 2, "--size", 128)


def test_verify_passes_then_catches_corruption(tmp_path, capsys):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=2)
    out = tmp_path / "out"
    shard("folder", "--src", src, "--out", out, "--shard-size", 2)
    assert verify.verify(str(out), progress=False)["errors"] == []
    # a shard whose dwt.f16 no longer matches its jpg (manifest updated, so only the content check can see it)
    path = out / "shard-000000.tar"
    members = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    m0, d0 = next((m, d) for m, d in members if m.name.endswith(".dwt.f16"))
    bands = np.frombuffer(d0, "<f2").copy()
    bands[:1000] += 0.5
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=rebuilt, mode="w") as tar:
        for m, d in members:
            d = bands.tobytes() if m is m0 else d
            m.size = len(d)
            tar.addfile(m, io.BytesIO(d))
    path.write_bytes(rebuilt.getvalue())
    man = manifest(out)
    import hashlib
    man["shards"][0].update(bytes=len(rebuilt.getvalue()), sha256=hashlib.sha256(rebuilt.getvalue()).hexdigest())
    (out / "manifest.json").write_text(json.dumps(man))
    errors = verify.verify(str(out), progress=False)["errors"]
    assert len(errors) == 1 and "dwt.f16 differs" in errors[0]
    # a flipped byte: the sha256 and (here) the JPEG check fail; the CLI exits 1
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as e:
        verify.main([str(out)])
    assert e.value.code == 1 and "sha256 differs" in capsys.readouterr().out
    (out / "shard-000001.tar").unlink()
    assert any("missing" in x for x in verify.verify(str(out), progress=False)["errors"])


def test_preview_and_no_dwt(tmp_path):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=2, size=64)
    shard("folder", "--src", src, "--out", tmp_path / "with", "--size", 64)
    shard("folder", "--src", src, "--out", tmp_path / "without", "--size", 64, "--no-dwt")
    assert all("dwt.f16" not in s for s in samples(tmp_path / "without").values())
    assert verify.verify(str(tmp_path / "without"), progress=False)["errors"] == []
    both = np.asarray(Image.open(preview.preview(str(tmp_path / "with"), 4, str(tmp_path / "a.png"))))
    crops = np.asarray(Image.open(preview.preview(str(tmp_path / "without"), 4, str(tmp_path / "b.png"))))
    assert both.shape[1] == 2 * crops.shape[1] + 8  # crops | reconstructions
    left, right = both[:, : crops.shape[1]].astype(int), both[:, crops.shape[1] + 8:].astype(int)
    assert np.abs(left - right).mean() < 3  # the IDWT of the stored bands looks like the stored crop


def test_real_faces_folder(tmp_path):
    """Real JPEGs (LFW, 250x250) through the folder job and verify: the DWT tolerance holds on real data."""
    src = real_faces_folder(tmp_path / "lfw", 24)
    shard("folder", "--src", src, "--out", tmp_path / "out", "--shard-size", 8)
    assert manifest(tmp_path / "out")["totals"]["samples"] == 24
    assert verify.verify(str(tmp_path / "out"), progress=False)["errors"] == []
    # the same faces in VGGFace2's layout with a generated loose-box file (LFW faces sit mid-frame)
    vgg = tmp_path / "vgg"
    rows = ["NAME_ID,X,Y,W,H"]
    for p in sorted((src / "lfw-deepfunneled").rglob("*.jpg")):
        rel = p.relative_to(src / "lfw-deepfunneled")
        (vgg / "train" / rel).parent.mkdir(parents=True, exist_ok=True)
        (vgg / "train" / rel).write_bytes(p.read_bytes())
        rows.append(f'"{rel.with_suffix("").as_posix()}",75,62,100,124')
    (vgg / "bb_landmark").mkdir()
    (vgg / "bb_landmark" / "loose_bb_train.csv").write_text("\n".join(rows) + "\n")
    shard("vggface2", "--src", vgg, "--out", tmp_path / "vout", "--shard-size", 8)
    m = manifest(tmp_path / "vout")
    assert m["totals"]["samples"] == 24 and m["totals"]["box_fallback"] == 0 and m["skipped"] == []
    assert verify.verify(str(tmp_path / "vout"), progress=False)["errors"] == []
