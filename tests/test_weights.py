"""trainer.weights.load: pre-trained weights from safetensors (local and bucket) and from DeepSpeed runs' EMA; what
makes published weights trusted (a pinned digest, a checksum beside them, plain file names in index.json)."""
import hashlib
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from helpers import fake_run
from trainer.core.models import build_model
from trainer.weights.load import apply_pretrained, is_training_run, load_model, load_pretrained
from trainer.weights.publish import export, publish

URL = "s3://test-bucket/models/tiny"


def test_safetensors_round_trip_and_key_report(tmp_path):
    torch.manual_seed(0)
    src = build_model("tiny", 3, 16)
    path = tmp_path / "m.safetensors"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    del state["head.bias"]
    save_file(state, str(path))
    dst = build_model("tiny", 3, 16)
    missing, unexpected = apply_pretrained(dst, load_pretrained(str(path)))
    assert missing == ["head.bias"] and unexpected == ["extra.weight"]
    assert torch.equal(dst.head.weight, src.head.weight)
    with pytest.raises(SystemExit, match="pos_embed"):
        apply_pretrained(build_model("tiny", 3, 32), load_pretrained(str(path)))  # another resolution
    with pytest.raises(SystemExit, match="no such file"):
        load_pretrained(str(tmp_path / "nope.safetensors"))
    with pytest.raises(SystemExit, match="neither"):
        load_pretrained(str(tmp_path))
    # an exported file holds the EMA only: asking it for the online weights names the way out
    with pytest.raises(SystemExit, match="only the EMA weights.*--init-weights ema"):
        load_pretrained(str(path), "online")
    assert not is_training_run(str(path))


def test_safetensors_from_a_bucket(tmp_path, s3_server):
    import fsspec

    torch.manual_seed(1)
    src = build_model("tiny", 3, 16)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    fsspec.filesystem("s3", skip_instance_cache=True).put_file(str(tmp_path / "m.safetensors"),
                                                              "test-bucket/models/m.safetensors")
    url = "s3://test-bucket/models/m.safetensors"
    # no m.safetensors.sha256 beside it: nothing says the bytes are whole; refused unless the user accepts that
    with pytest.raises(SystemExit, match=re.escape(f"error: {url}: no {url}.sha256 beside it") + ".*"
                       + re.escape(f"pin their digest ({url}#sha256=HEX) or pass --allow-unverified")):
        load_pretrained(url)
    state = load_pretrained(url, allow_unverified=True)
    assert all(torch.equal(state[k], v) for k, v in src.state_dict().items())
    digest = hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    assert load_pretrained(f"{url}#sha256={digest.upper()}").keys() == state.keys()  # a pin verifies it too


def exported(tmp_path, name="model.safetensors", dtype="fp32"):
    """An export of a fake run (trainer.export's files: NAME.safetensors, its .sha256, README.md) and its sha256."""
    run = tmp_path / "run" if (tmp_path / "run").exists() else fake_run(tmp_path / "run")
    meta = export(str(run), tmp_path / f"export-{dtype}" / name, dtype=dtype, log=lambda *a: None)
    return tmp_path / f"export-{dtype}" / name, meta["sha256"]


def test_a_pinned_digest_refuses_weights_replaced_with_their_checksum(tmp_path, s3_server, monkeypatch):
    from trainer.sample import main as sample_main

    weights, digest = exported(tmp_path)
    publish(weights, URL, log=lambda *a: None)
    for source in (f"{URL}#sha256={digest}", f"{URL}/model.safetensors#sha256={digest}"):
        assert load_model(source)[2]["sha256"] == digest
    # whoever can write the bucket replaces the weights and the index together: consistent, so only the pin notices
    other, other_digest = exported(tmp_path, dtype="fp16")
    publish(other, URL, log=lambda *a: None)
    assert load_model(URL)[2]["sha256"] == other_digest
    for source in (f"{URL}#sha256={digest}", f"{URL}/model.safetensors#sha256={digest}"):
        with pytest.raises(SystemExit, match=re.escape(f"error: {source.split('#')[0]}: sha256 {other_digest} is not "
                                                       f"the pinned #sha256={digest}: these are not the weights")):
            load_model(source)
    with pytest.raises(SystemExit, match="is not the pinned"):
        sample_main(["--ckpt", f"{URL}#sha256={digest}", "--n", "1", "--out", str(tmp_path / "s")])
    monkeypatch.chdir(tmp_path)  # the default output folder is named after the model, not the pin
    sample_main(["--ckpt", f"{URL}#sha256={other_digest}", "--n", "1", "--steps", "2"])
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["tiny-step3"]
    with pytest.raises(SystemExit, match=re.escape(f"error: {URL}#sha256=abc: #sha256= takes the 64 hex digits")):
        load_model(f"{URL}#sha256=abc")
    with pytest.raises(SystemExit, match="a training run has no single digest"):
        load_model(f"{tmp_path / 'run'}#sha256={digest}")


def test_a_url_without_a_checksum_needs_allow_unverified(tmp_path, s3_server):
    import fsspec

    from trainer.sample import main as sample_main

    weights, digest = exported(tmp_path)
    fsspec.filesystem("s3", skip_instance_cache=True).put_file(str(weights), f"{URL[5:]}/model.safetensors")
    url = f"{URL}/model.safetensors"  # no model.safetensors.sha256 beside it
    args = ["--ckpt", url, "--n", "1", "--steps", "2", "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit, match=re.escape(f"error: {url}: no {url}.sha256 beside it")):
        sample_main(args)
    sample_main([*args, "--allow-unverified"])
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 1
    assert load_model(str(weights))[2]["sha256"] == digest  # a local file is the user's own: read as before


@pytest.mark.parametrize("name", ["../model.safetensors", "sub/model.safetensors", "sub\\model.safetensors", "",
                                  "/abs.safetensors", "C:model.safetensors", "model\x1b[2J.safetensors"])
@pytest.mark.parametrize("where", ["weights", "files"])
def test_unsafe_names_in_index_json_are_refused(tmp_path, name, where):
    weights, digest = exported(tmp_path)
    publish(weights, str(tmp_path / "pub"), log=lambda *a: None)
    shutil.copy(weights, tmp_path / "model.safetensors")  # what "../model.safetensors" would reach
    index = json.loads((tmp_path / "pub" / "index.json").read_text())
    if where == "weights":
        index["weights"] = name
        index["files"][name] = index["files"]["model.safetensors"]
    else:
        index["files"][name] = index["files"]["README.md"]
    (tmp_path / "pub" / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path / 'pub'}: index.json names the file "
                                                   f"{name!r}") + r" \(.*\); refusing it"):
        load_pretrained(str(tmp_path / "pub"))


@pytest.mark.parametrize("name", ["model\\x.safetensors", "model..safetensors", "model\n.safetensors"])
def test_publish_refuses_an_unsafe_name(tmp_path, name):
    weights, _ = exported(tmp_path)
    for suffix in ("", ".sha256"):
        shutil.copy(f"{weights}{suffix}", weights.parent / f"{name}{suffix}")
    with pytest.raises(SystemExit, match="cannot be published"):
        publish(weights.parent / name, str(tmp_path / "pub"), log=lambda *a: None)
    assert not (tmp_path / "pub").exists()
