"""pipeline as users run it: real processes, a SIGKILL mid-job, and a real S3 endpoint on 127.0.0.1."""
import os
import signal
import subprocess
import sys

import psutil  # (a DeepSpeed dependency)
import pytest

from helpers import identity_tree, wait_for

pytestmark = pytest.mark.slow  # CLIs as subprocesses, worker pools, a moto server


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, timeout=300,
                          **kw)


def alive(process: psutil.Process) -> bool:
    """Still running (a zombie waiting for its new parent to reap it writes nothing more)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path):
    src = identity_tree(tmp_path / "src", identities=8, per_identity=8, size=600)  # 64 images, 32 shards
    flags = ["folder", "--src", src, "--shard-size", 2, "--workers", 2]
    ref = cli("pipeline.shard", *flags, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.shard", *map(str, flags), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list((out / ".state").glob("shard-*.json"))) >= 3, 120,  # a few shards done, more in flight
             "3 complete shards (if the job ended first, make the corpus larger)", poll=0.01,
             alive=lambda: proc.poll() is None)
    workers = psutil.Process(proc.pid).children(recursive=True)  # the pool's processes
    assert workers, "the job has no worker processes: --workers 2 did not start a pool"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    reference = files(tmp_path / "ref")
    for name, data in files(out).items():  # whatever is visible under a final name is complete and correct
        if name.endswith(".tar"):
            assert data == reference[name], f"{name} is visible but differs from the uninterrupted run"
    # the pool workers die with their parent (PR_SET_PDEATHSIG); until they have, one may still complete a shard
    wait_for(lambda: not any(alive(w) for w in workers), 60, "the pool workers to die with their parent")
    done = len(list((out / ".state").glob("shard-*.json")))
    rerun = cli("pipeline.shard", *flags, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    assert f"owns 32, {done} already complete" in rerun.stderr
    assert files(out) == reference  # same shards, same manifest; temporary files cleaned up
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_shard_to_s3_verify_and_preview(tmp_path, s3_server):
    import fsspec

    src = identity_tree(tmp_path / "src", identities=2, per_identity=3, size=96)
    url = "s3://test-bucket/faces/v1"
    run = cli("pipeline.shard", "folder", "--src", src, "--out", url, "--shard-size", 2, "--workers", 2)
    assert run.returncode == 0, run.stderr
    local = cli("pipeline.shard", "folder", "--src", src, "--out", tmp_path / "local", "--shard-size", 2)
    assert local.returncode == 0, local.stderr
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("test-bucket/faces/v1", detail=False))
    assert names == [".state", "manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name, data in files(tmp_path / "local").items():  # the bucket holds exactly what a local run makes
        assert fs.cat(f"test-bucket/faces/v1/{name}") == data
    check = cli("pipeline.verify", url, "--workers", 2)
    assert check.returncode == 0 and "6 samples: OK" in check.stdout, check.stdout + check.stderr
    png = tmp_path / "grid.png"
    assert cli("pipeline.preview", url, "--n", 4, "--out", png).returncode == 0 and png.stat().st_size > 0
    fs.rm("test-bucket/faces/v1/shard-000001.tar")
    broken = cli("pipeline.verify", url)
    assert broken.returncode == 1 and "shard-000001.tar: missing" in broken.stdout


def test_strict_with_workers_stops_instead_of_hanging(tmp_path):
    src = identity_tree(tmp_path / "src", identities=2, per_identity=3, size=64)
    (src / "id001" / "empty.jpg").write_bytes(b"")
    r = cli("pipeline.shard", "folder", "--src", src, "--out", tmp_path / "o", "--shard-size", 2, "--workers", 2,
            "--strict")
    assert r.returncode == 1 and "empty.jpg: empty file" in r.stderr


def test_cli_errors_name_the_flag(tmp_path):
    r = cli("pipeline.shard", "folder", "--src", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.returncode != 0 and "--src" in r.stderr and "not a directory" in r.stderr
    r = cli("pipeline.shard", "folder", "--src", tmp_path, "--out", tmp_path / "o", "--part", "3/2")
    assert r.returncode == 2 and "--part" in r.stderr
    r = cli("pipeline.verify", tmp_path)
    assert r.returncode != 0 and "manifest.json not found" in r.stderr
