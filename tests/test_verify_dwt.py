"""pipeline.verify's dwt.f16 check: fresh sets of real faces verify clean, wrong or shifted bands fail."""
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import real_faces_folder
from pipeline import verify
from pipeline.imaging import crop_from_dwt_f16, encode_jpeg, haar_dwt_f16, haar_dwt_uint8
from pipeline.schema import decode_dwt, encode_dwt
from pipeline.shard import main as shard_main

FACES = 240  # enough for the 32 px tail of JPEG's error (about 1 face in 100 passed the old mean bound of 0.01)


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    """The first FACES LFW faces as a folder corpus (skipped without ../shared/data)."""
    return real_faces_folder(tmp_path_factory.mktemp("lfw"), FACES)


def rewrite_dwt(out, changes: dict) -> None:
    """Replace the dwt.f16 payloads of shard 0 by changes[key](bands, all_bands) and re-record the shard in the
    manifest, so that only the content check can see the change."""
    path = out / "shard-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    size = json.loads((out / "manifest.json").read_text())["config"]["size"]
    bands = {m.name[: -len(".dwt.f16")]: decode_dwt(d, size) for m, d in members if m.name.endswith(".dwt.f16")}
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=rebuilt, mode="w") as tar:
        for m, d in members:
            key = m.name[: -len(".dwt.f16")]
            if m.name.endswith(".dwt.f16") and key in changes:
                d = encode_dwt(changes[key](bands[key], bands))
            m.size = len(d)
            tar.addfile(m, io.BytesIO(d))
    path.write_bytes(rebuilt.getvalue())
    man = json.loads((out / "manifest.json").read_text())
    man["shards"][0].update(bytes=len(rebuilt.getvalue()), sha256=hashlib.sha256(rebuilt.getvalue()).hexdigest())
    (out / "manifest.json").write_text(json.dumps(man))


def shifted(bands, _):
    """The DWT of the same crop moved right by one pixel (edge column repeated)."""
    crop = crop_from_dwt_f16(bands)
    return haar_dwt_f16(np.concatenate([crop[:, :1], crop[:, :-1]], axis=1))


def other_crop(bands, everything):
    return next(b for b in everything.values() if b is not bands)


def swapped_hv(bands, _):
    return np.concatenate([bands[0:3], bands[6:9], bands[3:6], bands[9:12]])


def doubled(bands, _):  # e.g. the orthonormal 1/2 forgotten
    return bands * 2


def one_step_off(bands, _):  # the smallest change a float16 band can hold
    out = bands.copy()
    out[3, 0, 0] += np.float16(1 / 510)
    return out


def test_dwt_mean_tol_is_the_rms_error_of_jpeg_q95_on_busy_content():
    """DWT_MEAN_TOL from Pillow's quality-95 tables (the derivation in pipeline.verify), and noise stays under it
    at the smallest crops, where the mean over few coefficients varies most."""
    q = Image.open(io.BytesIO(encode_jpeg(np.zeros((8, 8, 3), np.uint8)))).quantization
    var_y, var_c = (np.mean(np.square(q[t])) / 12 + 2 / 12 for t in (0, 1))
    var_rgb = [var_y + 1.402 ** 2 * var_c, var_y + (0.344136 ** 2 + 0.714136 ** 2) * var_c, var_y + 1.772 ** 2 * var_c]
    assert verify.DWT_MEAN_TOL == round(float(np.sqrt(np.mean(var_rgb) + 1 / 12)) / 255, 4)
    rng = np.random.default_rng(0)
    for size in (8, 10, 64):
        for _ in range(20):
            crop = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            decoded = np.asarray(Image.open(io.BytesIO(encode_jpeg(crop))))
            diff = np.abs(haar_dwt_uint8(decoded) - haar_dwt_uint8(crop))
            assert diff.mean() < verify.DWT_MEAN_TOL and diff.max() < verify.DWT_TOL


def test_crop_from_dwt_f16_is_exact():
    rng = np.random.default_rng(1)
    crop = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    crop[:4], crop[4:8] = 0, 255  # the extremes, where float16 is coarsest
    assert np.array_equal(crop_from_dwt_f16(haar_dwt_f16(crop)), crop)
    assert crop_from_dwt_f16(one_step_off(haar_dwt_f16(crop), None)) is None


@pytest.mark.parametrize("size", [32, 64])
def test_fresh_real_faces_verify_clean_and_wrong_bands_fail(lfw, tmp_path, size):
    out = tmp_path / "out"
    shard_main(["folder", "--src", str(lfw), "--out", str(out), "--size", str(size), "--shard-size", "120"])
    for exact in (True, False):  # exactly, and within JPEG's error alone (another encoder than the set's)
        result = verify.verify(str(out), progress=False, exact=exact)
        assert result["errors"] == [] and result["samples"] == FACES and result["exact"] is exact
    assert verify.verify(str(out), progress=False)["exact"] is True  # same encoder as the manifest's
    with tarfile.open(out / "shard-000000.tar") as tar:
        keys = sorted({m.name[: -len(".dwt.f16")] for m in tar.getmembers() if m.name.endswith(".dwt.f16")})
    changes = dict(zip(keys[::7], [shifted, other_crop, swapped_hv, doubled, one_step_off]))
    rewrite_dwt(out, changes)
    errors = verify.verify(str(out), progress=False)["errors"]
    assert sorted(e.split(":")[0] for e in errors) == sorted(changes)
    # JPEG's error bound alone still sees a shift, another crop and a wrong scale at these sizes
    errors = verify.verify(str(out), progress=False, exact=False)["errors"]
    caught = {e.split(":")[0] for e in errors}
    assert {k for k, f in changes.items() if f in (shifted, other_crop, doubled)} <= caught
    assert all("differs from the DWT of the jpg" in e for e in errors)
