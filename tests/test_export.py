"""trainer.export and the loaders of trainer.weights.load: a 2-rank ZeRO-3 run on CPU (real launcher) exported in fp32
and fp16, published to a real S3 endpoint (moto), loaded back by path and by URL. The samples of one seed are
bit-identical whether the weights come from the DeepSpeed checkpoint, the fp32 export or the published URL."""
import hashlib
import json
import re
import shutil
from importlib.metadata import version

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.core.diffusion import alphas_cumprod, make_betas
from trainer.core.models import build_model
from trainer.core.sampling import make_clip, sample
from trainer.export import main as export_main
from trainer.train.config import ExperimentConfig
from trainer.weights.load import load_model, load_pretrained, read_deepspeed
from trainer.weights.publish import publish

pytestmark = pytest.mark.slow

# fp16 keeps ~3 significant digits per weight; after 3 DDIM steps of this tiny model the samples move by ~1e-3
FP16_ATOL = 2e-2
URL = "s3://test-bucket/models/tiny"


@pytest.fixture(scope="module")
def run(tmp_path_factory, zero_run):
    """A 4-step ZeRO-3 run (checkpoints at steps 2 and 4; a copy of the shared one, conftest.zero_run), plus the
    evaluation records trainer.evaluate appends."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(zero_run(3).run, root / "run")
    with open(root / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "fid": 123.5, "kid": 0.25, "n": 8}) + "\n")
        f.write(json.dumps({"step": 2, "fid": 777.25}) + "\n")  # the step-2 checkpoint's, not step 4's
    return root


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    export_main([str(run / "run"), "--out", str(out / "fp32" / "model.safetensors")])
    export_main([str(run / "run" / "checkpoints"), "--out", str(out / "fp16" / "model.safetensors"),
                 "--dtype", "fp16"])
    return out


def metadata(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {k: v if k == "format" else json.loads(v) for k, v in meta.items()}, tensors


def draw(model, cfg, seed=7):
    """4 images, 3 DDIM steps, from a seeded CPU generator."""
    return sample(model, (4, 3, 16, 16), alphas_cumprod(make_betas(cfg.train.schedule)), steps=3, eta=0.0,
                  clip=make_clip("pixel"), generator=torch.Generator().manual_seed(seed))


def test_export_metadata_model_card_and_checksum(run, exports, tmp_path, train_shards):
    client, _ = read_deepspeed(run / "run")
    path = exports / "fp32" / "model.safetensors"
    meta, tensors = metadata(path)
    assert set(tensors) == set(client["ema"]["shadow"])
    assert all(torch.equal(tensors[k], v) and v.dtype == torch.float32 for k, v in client["ema"]["shadow"].items())
    assert meta["config"] == client["config"] and meta["step"] == 4 and meta["images"] == 4 * 8
    assert meta["dtype"] == "float32" and meta["maskdm_format"] == 1 and meta["format"] == "pt"
    assert meta["maskdm_version"] == version("maskdm") and meta["checkpoint"] == "step00000004"
    manifest = (train_shards / "manifest.json").read_bytes()
    assert meta["data"] == [{"source": str(train_shards), "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
                             "samples": 32}]
    train = [json.loads(x) for x in (run / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert meta["metrics"] == {"train": train, "eval": [{"step": 4, "fid": 123.5, "kid": 0.25, "n": 8}]}
    params = sum(p.numel() for p in build_model("tiny", 3, 16, 4, dim=32, heads=2).parameters())
    assert meta["architecture"]["params"] == params and meta["architecture"]["preset"] == "tiny"

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (exports / "fp32" / "model.safetensors.sha256").read_text() == f"{digest}  model.safetensors\n"
    card = (exports / "fp32" / "README.md").read_text()
    for text in ("U-ViT-tiny", f"{params:,}", "pixel: RGB 16x16", "4 steps, 32 images", "fid: 123.5", "--init",
                 "python -m trainer.sample --ckpt", "terms of each dataset", digest, str(train_shards)):
        assert text in card, text
    assert "777.25" not in card  # the other checkpoint's evaluation

    meta16, tensors16 = metadata(exports / "fp16" / "model.safetensors")
    assert meta16["dtype"] == "float16" and meta16["config"] == client["config"]
    assert all(torch.equal(tensors16[k], v.half()) for k, v in client["ema"]["shadow"].items())
    # the same checkpoint and flags give the same bytes: what makes re-publishing a no-op
    export_main([str(run / "run"), "--out", str(tmp_path / "model.safetensors")])
    assert (tmp_path / "model.safetensors").read_bytes() == path.read_bytes()
    assert (tmp_path / "README.md").read_bytes() == (exports / "fp32" / "README.md").read_bytes()


def test_export_an_earlier_tag(run, tmp_path, capsys):
    export_main([str(run / "run"), "--tag", "step00000002", "--out", str(tmp_path / "m.safetensors")])
    out = capsys.readouterr().out
    assert "step 2, 16 images" in out and "wrote" in out and "sha256" in out
    meta, tensors = metadata(tmp_path / "m.safetensors")
    client, _ = read_deepspeed(run / "run", "step00000002")
    assert meta["step"] == 2 and meta["checkpoint"] == "step00000002"
    assert meta["metrics"]["train"]["step"] == 2 and meta["metrics"]["eval"] == [{"step": 2, "fid": 777.25}]
    assert all(torch.equal(tensors[k], v) for k, v in client["ema"]["shadow"].items())


def record_puts(monkeypatch):
    """Names of the objects uploaded to S3 from now on, in order."""
    import s3fs

    puts, put_file = [], s3fs.S3FileSystem._put_file

    async def recording(self, lpath, rpath, *args, **kwargs):
        puts.append(rpath.rsplit("/", 1)[-1])
        return await put_file(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", recording)
    s3fs.S3FileSystem.clear_instance_cache()  # sync methods are bound when an instance is made
    return puts


def test_samples_are_identical_from_checkpoint_export_and_published_url(run, exports, tmp_path, s3_server,
                                                                         monkeypatch):
    import fsspec

    puts = record_puts(monkeypatch)
    export_main([str(run / "run"), "--out", str(tmp_path / "pub" / "model.safetensors"), "--publish", URL])
    assert puts == ["README.md", "model.safetensors.sha256", "model.safetensors", "index.json"]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    index = json.loads(fs.cat_file("test-bucket/models/tiny/index.json"))
    for name in puts[:3]:
        data = (tmp_path / "pub" / name).read_bytes()
        assert index["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert fs.cat_file(f"test-bucket/models/tiny/{name}") == data
    assert index["weights"] == "model.safetensors" and index["metadata"]["step"] == 4
    assert f"--init {URL}" in (tmp_path / "pub" / "README.md").read_text()

    client, _ = read_deepspeed(run / "run")
    ref_model, ref_cfg, ref_meta = load_model(str(run / "run"))
    assert not ref_model.training and ref_meta["step"] == 4 and ref_meta["kind"] == "deepspeed"
    assert ref_cfg == ExperimentConfig.from_dict(client["config"])
    ref = draw(ref_model, ref_cfg)
    sources = [str(run / "run" / "checkpoints" / "step00000004"), str(exports / "fp32" / "model.safetensors"),
               URL, URL + "/", f"{URL}/model.safetensors"]
    for source in sources:
        model, cfg, meta = load_model(source)
        assert cfg == ref_cfg and meta["step"] == 4 and not model.training, source
        assert torch.equal(draw(model, cfg), ref), source  # bit-identical: the same fp32 weights
    assert not torch.equal(draw(ref_model, ref_cfg, seed=8), ref)  # (the seed matters)
    state = load_pretrained(URL)  # what finetune --init reads
    assert all(torch.equal(state[k], v) for k, v in client["ema"]["shadow"].items())

    model16, cfg16, meta16 = load_model(str(exports / "fp16" / "model.safetensors"))
    x16 = draw(model16, cfg16)
    assert meta16["dtype"] == "float16" and not torch.equal(x16, ref)  # really rounded ...
    # ... and close: three DDIM steps with x0 clipping can flip a value that sits on a clip boundary, so a rare
    # element (at most 1 in 1000) may differ by more; the rest are within FP16_ATOL
    off = (x16 - ref).abs()
    assert (off > FP16_ATOL).float().mean() <= 1e-3 and off.mean() <= FP16_ATOL / 10, (off.max(), off.mean())
    # a published folder on local disk reads the same way
    assert publish(exports / "fp32" / "model.safetensors", str(tmp_path / "local"), log=lambda *a: None) == "published"
    assert torch.equal(draw(*load_model(str(tmp_path / "local"))[:2]), ref)


def test_republish_is_a_no_op_and_a_corrupted_object_is_refused(run, exports, tmp_path, s3_server, monkeypatch,
                                                                capsys):
    import fsspec

    puts = record_puts(monkeypatch)
    args = [str(run / "run"), "--out", str(tmp_path / "pub" / "model.safetensors"), "--publish", URL]
    export_main(args)
    assert len(puts) == 4
    capsys.readouterr()
    export_main(args)  # the same content again
    assert len(puts) == 4 and "nothing uploaded" in capsys.readouterr().out

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    key = "test-bucket/models/tiny/model.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0xFF  # one flipped byte in the last weight, same size
    fs.pipe_file(key, bytes(data))
    with pytest.raises(SystemExit, match="sha256 .* but index.json says"):
        load_model(URL)
    with pytest.raises(SystemExit, match="does not match .*model.safetensors.sha256"):
        load_pretrained(f"{URL}/model.safetensors")
    export_main(args + ["--force"])  # repairs it
    assert len(puts) == 8 and load_model(URL)[2]["step"] == 4

    # other content (fp16) under the same name: the old index goes first, the new one last
    export_main([str(run / "run"), "--out", str(tmp_path / "pub16" / "model.safetensors"), "--dtype", "fp16",
                 "--publish", URL])
    assert "removed the old index.json" in capsys.readouterr().out and puts[-1] == "index.json"
    assert load_model(URL)[2]["dtype"] == "float16"


def test_clear_errors(run, exports, tmp_path):
    out = ["--out", str(tmp_path / "x" / "model.safetensors")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=re.escape(f"{tmp_path / 'empty'}: neither") + ".* --run-dir of pretrain"):
        export_main([str(tmp_path / "empty"), *out])
    with pytest.raises(SystemExit, match="no such directory"):
        export_main([str(tmp_path / "nope"), *out])
    with pytest.raises(SystemExit, match="no checkpoint tag 'step00000099'"):
        export_main([str(run / "run"), "--tag", "step00000099", *out])
    with pytest.raises(SystemExit, match="NAME.safetensors"):
        export_main([str(run / "run"), "--out", str(tmp_path / "model.pt")])
    (tmp_path / "README.md").write_text("# my project\n")  # --out in a folder that holds something else
    with pytest.raises(SystemExit, match="not a maskdm model card"):
        export_main([str(run / "run"), "--out", str(tmp_path / "model.safetensors")])
    assert (tmp_path / "README.md").read_text() == "# my project\n" and not (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / "x").exists()

    plain = tmp_path / "plain.safetensors"  # weights without maskdm metadata: fine-tuning yes, load_model no
    save_file({k: v.contiguous() for k, v in build_model("tiny", 3, 16).state_dict().items()}, str(plain))
    assert set(load_pretrained(str(plain))) == set(build_model("tiny", 3, 16).state_dict())
    with pytest.raises(SystemExit, match="no maskdm config"):
        load_model(str(plain))
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "model.safetensors"
    bad.write_bytes((exports / "fp32" / "model.safetensors").read_bytes())
    (tmp_path / "bad" / "model.safetensors.sha256").write_text("0" * 64 + "  model.safetensors\n")
    with pytest.raises(SystemExit, match="corrupt or incomplete"):
        load_model(str(bad))
