"""User errors end in one line naming the flag or file and the fix, never a traceback: refused bucket credentials in
every command that touches a bucket (real S3 endpoint: moto, with signatures checked), data sources that are not
shard sets (checked before a run directory exists), the model card's sampling command run as written, and
pixel-mode resizing reported once instead of silently."""
import itertools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import enable_auth, fake_run, identity_tree, jpeg_shard_set

REPO = Path(__file__).resolve().parents[1]
BUCKET = "s3://test-bucket"
SECRET = "garbled-S3cr3t-never-printed"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """6 shards of 16 px crops (2 samples each)."""
    return jpeg_shard_set(tmp_path_factory.mktemp("cli"), identities=3, per_identity=4, size=40, crop=16,
                          shard_size=2)


# --- refused credentials: the bucket and the variables, in every command, never the secret ------------------------


def commands(root: Path, shards: Path) -> dict[str, list[str]]:
    """Each command a user types against a bucket (arguments after `python`)."""
    run = fake_run(root / "run")
    return {
        "shard": ["-m", "pipeline.shard", "folder", "--src", str(shards.parent / "src"), "--out", f"{BUCKET}/new",
                  "--size", "16"],
        "verify": ["-m", "pipeline.verify", f"{BUCKET}/shards"],
        "sample": ["-m", "trainer.sample", "--ckpt", f"{BUCKET}/models/tiny/model.safetensors"],
        "export": ["-m", "trainer.export", str(run), "--out", str(root / "export" / "model.safetensors"),
                   "--publish", f"{BUCKET}/models/tiny"],
        "evaluate": ["-m", "trainer.evaluate", "--fake", str(shards.parent / "src"), "--ref", f"{BUCKET}/shards"],
        "pretrain": [str(REPO / "trainer" / "pretrain.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
                     "--deepspeed_config", str(REPO / "ds_configs" / "cpu_fp32.json"), "--run-dir",
                     str(root / "train-run"), "--set", f"data.sources=[{BUCKET}/shards]"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("credentials", ["wrong", "missing"])
def test_every_bucket_command_names_the_bucket_and_variables(s3_server, shards, tmp_path, credentials):
    fs_key = enable_auth(s3_server) if credentials == "wrong" else None
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", MASKDM_BUCKET_RETRIES="0", PYTHONPATH=str(REPO))
    if fs_key is not None:  # a real key id with a garbled secret: the server refuses the signature (403)
        env.update(AWS_ACCESS_KEY_ID=fs_key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=SECRET)
    failures = []
    for name, args in commands(tmp_path, shards).items():
        r = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        text = r.stdout + r.stderr
        expected = ["error: s3://test-bucket/", "bucket 'test-bucket' was refused",
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SECRET_ACCESS_KEY "
                    + ("set" if fs_key else "unset")]
        if r.returncode != 1 or "Traceback" in text or SECRET in text or not all(e in r.stderr for e in expected):
            failures.append(f"{name} (exit {r.returncode}):\n{text[-3000:]}")
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "train-run").exists()  # refused before the run directory was made


# --- data sources that are not shard sets: said before a run directory exists ------------------------------------

def train(main, source, run_dir, *extra):
    main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--deepspeed_config",
          str(REPO / "ds_configs" / "cpu_fp32.json"), "--run-dir", str(run_dir), "--set",
          f"data.sources=[{source}]" if source is not None else "data.sources=[]", *extra])


@pytest.mark.parametrize("case, needles", [
    ("missing", ["manifest.json not found", "no such folder"]),
    ("images", ["manifest.json not found", "is a folder of images, not a shard set",
                "python -m pipeline.shard folder --src", "--out SHARDS"]),
    ("interrupted", ["holds 6 .tar files but no manifest.json: an interrupted `python -m pipeline.shard` job",
                     "Re-run the same command", "python -m pipeline.merge"]),
    ("no sources", ["data.sources is empty", "python -m pipeline.shard folder --src DIR --out SHARDS"]),
])
def test_training_on_what_is_not_a_shard_set_says_which_case(shards, tmp_path, case, needles):
    from trainer.finetune import main as finetune_main
    from trainer.pretrain import main as pretrain_main

    source = None if case == "no sources" else tmp_path / case
    if case == "images":
        identity_tree(source, identities=2, per_identity=1, size=20)  # ID/IMAGE.jpg: images one folder down
    elif case == "interrupted":
        shutil.copytree(shards, source)
        (source / "manifest.json").unlink()
    for main, extra in ((pretrain_main, ()), (finetune_main, ("--init", "unused", "--set", "mask.rate=0"))):
        with pytest.raises(SystemExit) as e:
            train(main, source, tmp_path / "run", *extra)
        assert str(e.value).startswith("error: ") and all(n in str(e.value) for n in needles), e.value
        assert not (tmp_path / "run").exists()  # refused before training_loop made the run directory


def test_a_deepspeed_json_that_sets_batch_sizes_is_refused(shards, tmp_path):
    """Batch sizes come from the experiment config; a JSON that sets them is refused, never silently overwritten."""
    import json

    from trainer.pretrain import main as pretrain_main

    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({**ds, "train_batch_size": 64, "gradient_accumulation_steps": 2}))
    with pytest.raises(SystemExit) as e:
        pretrain_main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--deepspeed_config", str(bad),
                       "--run-dir", str(tmp_path / "run"), "--set", f"data.sources=[{shards}]"])
    msg = str(e.value)
    assert msg.startswith(f"error: --deepspeed_config {bad} sets ['train_batch_size', 'gradient_accumulation_steps']")
    assert "train_batch_size -> train.global_batch" in msg and "Remove them from the JSON" in msg
    assert not (tmp_path / "run").exists()


def test_a_bucket_prefix_without_a_shard_set(s3_server, shards):
    import fsspec

    from trainer.data.shards import check_sources

    fsspec.filesystem("s3", skip_instance_cache=True).put(str(shards.parent / "src"), "test-bucket/images",
                                                          recursive=True)
    with pytest.raises(SystemExit, match=r"s3://test-bucket/nothing/manifest.json not found: .*nothing under this "
                                         r"bucket prefix"):
        check_sources([f"{BUCKET}/nothing"])
    with pytest.raises(SystemExit, match="s3://test-bucket/images is a folder of images, not a shard set"):
        check_sources([f"{BUCKET}/images"])


# --- the model card's sampling command works as written -----------------------------------------------------------

def test_model_card_sampling_command_runs_as_written(tmp_path, monkeypatch, capsys):
    from trainer.export import main as export_main
    from trainer.sample import main as sample_main

    run = fake_run(tmp_path / "run")
    export_main([str(run), "--out", str(tmp_path / "tiny" / "model.safetensors")])
    card = (tmp_path / "tiny" / "README.md").read_text()
    lines = [x for x in card.splitlines() if x.startswith("python -m trainer.sample")]
    assert len(lines) == 1, card
    argv = shlex.split(lines[0])[3:]
    monkeypatch.chdir(tmp_path / "tiny")  # "run this in the folder of this card"
    capsys.readouterr()
    sample_main(argv + ["--n", "2", "--steps", "2"])  # as written, only made cheaper
    out = capsys.readouterr().out
    assert "into samples/tiny-step3" in out, out
    assert len(list((tmp_path / "tiny" / "samples" / "tiny-step3" / "images").glob("*.png"))) == 2
    assert json.loads(out.strip().splitlines()[-1])["out"] == "samples/tiny-step3"


# --- pixel mode on shards of another size: one warning, not silence, not one per sample ------------------------------

def test_pixel_mode_resize_warns_once_with_both_sizes(shards, caplog):
    from trainer.data.stream import ShardStream, StreamConfig

    def batches(source, rank=0, n=4):
        stream = ShardStream(StreamConfig((source,), mode="pixel", resolution=8, batch_size=2, buffer=4), rank, 2)
        got = list(itertools.islice(iter(stream), n))
        assert got[0]["img"].shape == (2, 3, 8, 8)
        return [r.getMessage() for r in caplog.records if r.name == "trainer.data.stream"]

    with caplog.at_level(logging.WARNING):
        warnings = batches(str(shards))  # 8 samples resized, one warning (from the manifest, at construction)
        assert len(warnings) == 1 and all(s in warnings[0] for s in (str(shards), "16 px", "8 px")), warnings
        caplog.clear()
        assert batches(str(shards), rank=1) == []  # rank 0 speaks for the run
        caplog.clear()
        warnings = batches(f"{shards}/shard-{{000000..000005}}.tar")  # no manifest: noticed when decoding
        assert len(warnings) == 1 and "16x16" in warnings[0] and "8 px" in warnings[0], warnings
        caplog.clear()
        stream = ShardStream(StreamConfig((str(shards),), mode="pixel", resolution=16, batch_size=2, buffer=4))
        next(iter(stream))
        assert [r for r in caplog.records if r.name == "trainer.data.stream"] == []  # same size: nothing to say


# --- credentials inside a URL: refused where the URL enters, never printed or stored ------------------------------

URL_KEY, URL_SECRET = "AKIAEXAMPLEKEYID", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # AWS secrets may hold "/" and "+"


@pytest.mark.slow
def test_credentials_in_a_url_are_refused_and_never_printed_or_stored(s3_server, shards, tmp_path):
    """Every command that takes a URL, given one with KEY:SECRET@: one line naming the flag or key and the URL
    without them, exit 1, and neither the secret nor the key in its output or in any file the commands left."""
    secret_bucket = f"s3://{URL_KEY}:{URL_SECRET}@test-bucket"
    runs = {name: [a.replace(BUCKET, secret_bucket) for a in args] for name, args in commands(tmp_path, shards).items()}
    quickstart = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--deepspeed_config",
                  str(REPO / "ds_configs" / "cpu_fp32.json")]
    runs["finetune"] = [str(REPO / "trainer" / "finetune.py"), *quickstart, "--run-dir", str(tmp_path / "ft-run"),
                        "--init", f"{secret_bucket}/models/tiny/model.safetensors", "--set", f"data.sources=[{shards}]",
                        "--set", "mask.rate=0"]
    runs["schedule"] = ["-m", "trainer.schedule", *quickstart, "--run-dir", str(tmp_path / "sched-run"), "--every",
                        "1", "--publish", f"{secret_bucket}/models", "--set", "data.sources=[/nonexistent]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASKDM_BUCKET_RETRIES": "0"}
    failures = []
    for name, args in runs.items():
        r = subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        text = r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        if (r.returncode != 1 or "Traceback" in text or URL_SECRET in text or URL_KEY in text or len(lines) != 1
                or "s3://test-bucket/" not in lines[0] or "remove the credentials (USER:SECRET@)" not in lines[0]
                or "AWS_ACCESS_KEY_ID" not in lines[0]):
            failures.append(f"{name} (exit {r.returncode}):\n{text[-3000:]}")
    assert not failures, "\n\n".join(failures)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and (URL_SECRET.encode() in p.read_bytes()
                                                                   or URL_KEY.encode() in p.read_bytes())]
    assert not leaked
    assert not (tmp_path / "train-run").exists() and not (tmp_path / "ft-run").exists()
    assert not (tmp_path / "export").exists()  # refused before the model card (which names the URL) was written


@pytest.mark.parametrize("url, shown", [
    (f"s3://{URL_KEY}:{URL_SECRET}@test-bucket/shards", "s3://test-bucket/shards"),
    ("s3://tok3nvalue@test-bucket/x", "s3://test-bucket/x"),
    ("https://user:p@ss@host:8443/set", "https://host:8443/set"),
    ("simplecache::s3://KEY:SECRET@b/x", "simplecache::s3://b/x"),
    ("s3://test-bucket/runs@v2/x", None),   # "@" in a path is no user-info
    ("https://host:8443/a@b", None),
    ("/data/shards@v2", None),
])
def test_credentials_are_found_in_any_url_and_shown_without_them(url, shown):
    from pipeline.credentials import credentials_in_url, credentials_message, without_credentials

    msg = credentials_in_url(url, "data.sources")
    assert (msg is None) == (shown is None)
    if shown:
        assert without_credentials(url) == shown and msg.startswith(f"data.sources {shown}: remove the credentials")
        userinfo = url[url.rindex("://") + 3:url.rindex("@")]
        assert userinfo not in credentials_message(url, PermissionError(f"denied for {url!r}"))
    else:
        assert without_credentials(url) == url


def test_the_config_refuses_a_source_with_credentials(tmp_path):
    from trainer.train.config import ExperimentConfig

    path = tmp_path / "exp.yaml"
    path.write_text(f"data: {{sources: [/local, 's3://{URL_KEY}:{URL_SECRET}@test-bucket/shards']}}\n")
    with pytest.raises(ValueError) as e:
        ExperimentConfig.from_yaml(path)
    assert str(e.value).startswith(f"{path}: data.sources s3://test-bucket/shards: remove the credentials")
    assert URL_SECRET not in str(e.value) and URL_KEY not in str(e.value)
