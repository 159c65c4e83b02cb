"""Streaming shards from a real S3 endpoint (moto on 127.0.0.1) under faults: an outage mid-stream, throttling
(503 SlowDown), a truncated shard, a missing shard, wrong or missing credentials; and exact epochs over 2 ranks x 2
workers from a bucket. The loader's backoff is made small through its environment variables; the client
libraries' own retries are turned off (AWS_MAX_ATTEMPTS=1, s3fs retries=1) so that every fault reaches the loader
and its retry count is exact."""
import errno
import itertools
import json
import logging
import re
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import enable_auth, identity_tree
from pipeline.reader import iter_samples
from pipeline.shard import main as shard_main
from trainer.data import bucket
from trainer.data import shards as data
from trainer.data.stream import ShardStream, StreamConfig

BUCKET_SET = "s3://test-bucket/sets/a"


@pytest.fixture(scope="module")
def local_set(tmp_path_factory):
    """24 synthetic faces, 32 px, jpg only, 6 shards of 4 (each shard ~25 KB: many 2 KB block reads)."""
    root = tmp_path_factory.mktemp("faults")
    src = identity_tree(root / "src", identities=6, per_identity=4, size=48, seed=3)
    shard_main(["folder", "--src", str(src), "--out", str(root / "set"), "--size", "32", "--no-dwt",
                "--shard-size", "4"])
    return root / "set"


@pytest.fixture
def fast_retries(monkeypatch):
    """Small backoff for the loader (also in worker processes: environment), no retries below it."""
    import s3fs

    monkeypatch.setenv(bucket.ENV_RETRIES, "12")  # waits up to 0.02 s doubling (jittered): at most ~80 s of outage
    monkeypatch.setenv(bucket.ENV_BACKOFF, "0.02")
    monkeypatch.setenv(bucket.ENV_BLOCK_SIZE, "2048")  # a shard is read in many range requests
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore: no retries of its own
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs: no retries of its own (class attribute)
    monkeypatch.setattr(bucket._retry_log, "every", 0.0)  # every retry logged, whatever other tests logged before


def upload(local: Path, endpoint: str, url: str = BUCKET_SET) -> None:
    """The shard set's files into the bucket, straight to `endpoint` (not through a proxy in front of it)."""
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdirs("test-bucket", exist_ok=True)
    for p in sorted(local.iterdir()):
        if p.is_file():
            fs.put_file(str(p), f"{url.split('://', 1)[1]}/{p.name}")


def shard_keys(local: Path) -> dict[str, list[str]]:
    manifest = json.loads((local / "manifest.json").read_text())
    return {e["name"]: [s["__key__"] for s in iter_samples((local / e["name"]).read_bytes())]
            for e in manifest["shards"]}


def config(**kw) -> StreamConfig:
    return StreamConfig((BUCKET_SET,), **{**dict(mode="pixel", order="exact", batch_size=2, shards_per_chunk=2,
                                                 buffer=4, seed=3, flip=True), **kw})


def loader(cfg, rank=0, world=1, workers=0, stream=None, **kw):
    return DataLoader(stream or ShardStream(cfg, rank, world, workers), batch_size=None, num_workers=workers,
                      multiprocessing_context="fork" if workers else None, **kw)  # workers inherit log handlers


def take(cfg, n, **kw) -> list[dict]:
    return list(itertools.islice(loader(cfg, **kw), n))


def keys(bs) -> list[str]:
    return [k for b in bs for k in b["keys"]]


def assert_same_batches(got, ref):
    assert keys(got) == keys(ref)
    assert all(torch.equal(a["img"], b["img"]) for a, b in zip(got, ref, strict=True))  # same bytes, same flips


def one_epoch(cfg) -> tuple[list[dict], dict]:
    """Batches of epoch 0 (batch_size 1, one process), and the first batch of epoch 1."""
    epoch0, it = [], iter(loader(cfg))
    for b in itertools.islice(it, 100):
        if b["epoch"] > 0:
            return epoch0, b
        epoch0.append(b)
    raise AssertionError("epoch 0 did not end within 100 samples")


def retries() -> int:
    return sum(bucket.RETRIES.values())


# --- exact epochs from a bucket ----------------------------------------------------------------------------------

@pytest.mark.slow  # DataLoader worker processes
def test_s3_exact_epochs_two_ranks_two_workers(tmp_path, s3_server):
    """Shard to s3:// with the CLI's code path, then 2 ranks x 2 DataLoader workers (4 slots, 6 shards): every sample
    exactly once in each of two epochs."""
    src = identity_tree(tmp_path / "src", identities=6, per_identity=4, size=48, seed=3)
    shard_main(["folder", "--src", str(src), "--out", BUCKET_SET, "--size", "32", "--no-dwt", "--shard-size", "4"])
    cfg = config(batch_size=1, shards_per_chunk=1, buffer=3)
    seen = defaultdict(Counter)
    for rank in (0, 1):
        for b in take(cfg, 40, rank=rank, world=2, workers=2):  # 20 per worker: two epochs even for 2-shard slots
            assert not b["skipped"], b["skipped"]
            seen[b["epoch"]].update(b["keys"])
    expected = {k for ks in shard_keys(_local_copy(tmp_path)).values() for k in ks}
    assert len(expected) == 24
    for epoch in (0, 1):
        assert set(seen[epoch]) == expected and set(seen[epoch].values()) == {1}, (epoch, seen[epoch])


def _local_copy(tmp_path) -> Path:
    """The bucket's shard set copied to a local folder (to read the expected keys independently of the loader)."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("manifest.json", *[f"shard-{i:06d}.tar" for i in range(6)]):
        (out / name).write_bytes(fs.cat(f"{BUCKET_SET.split('://', 1)[1]}/{name}"))
    return out


# --- transient faults: retried, nothing lost ---------------------------------------------------------------------

def outage(proxy, local: Path, retried) -> threading.Thread:
    """Take the endpoint down now (the proxy and moto processes stopped: port closed, connections cut); a thread
    brings moto back on the same port (empty), re-uploads the objects, and restarts the proxy once `retried()` says
    the loader has met the outage: every request in between is refused. `thread.failures` says what went wrong."""
    server = proxy.server
    proxy.stop()
    server.stop()

    def restart():
        try:
            server.start()
            upload(local, server.endpoint)
            deadline = time.monotonic() + 60
            while not retried() and time.monotonic() < deadline:
                time.sleep(0.01)  # a wait for the loader, not a timing assumption
            if not retried():
                thread.failures.append("the loader never retried during the outage")
        except Exception as e:  # noqa: BLE001 - reported by the test
            thread.failures.append(repr(e))
        finally:
            try:
                proxy.start()
            except Exception as e:  # noqa: BLE001 - reported by the test
                thread.failures.append(f"proxy restart: {e!r}")

    thread = threading.Thread(target=restart)
    thread.failures = []
    thread.start()
    return thread


def test_endpoint_outage_mid_stream_is_retried_and_loses_nothing(local_set, s3_proxy, fast_retries, caplog):
    """The endpoint goes down with shards half read and comes back empty on the same port, its objects re-uploaded:
    the loader retries with backoff (counted, logged), resumes the open shards at their byte offsets, and delivers
    exactly the undisturbed stream."""
    upload(local_set, s3_proxy.server.endpoint)
    cfg = config()
    reference = take(cfg, 12)  # 24 samples: one epoch
    before = retries()
    caplog.set_level("WARNING", logger="trainer.data.bucket")  # the retry warnings
    it = iter(loader(cfg))
    got = [next(it)]  # 2 samples out, 3 more in the shuffle buffer: both shards of chunk 0 are half read
    thread = outage(s3_proxy, local_set, lambda: retries() > before)
    got += [next(it) for _ in range(len(reference) - 1)]
    thread.join()
    assert not thread.failures, thread.failures
    assert_same_batches(got, reference)
    assert all(not b["skipped"] for b in got), [b["skipped"] for b in got]
    assert sum(got[-1]["retries"].values()) + sum(got[-2]["retries"].values()) > 0  # the batches carry the count
    assert retries() > before
    resumed = [int(m) for m in re.findall(r"reading at byte (\d+) of s3://\S+\.tar", caplog.text)]
    assert resumed and max(resumed) > 0, caplog.text  # a shard read failed half-way and was resumed, not restarted


@pytest.mark.slow  # DataLoader worker processes
def test_endpoint_outage_met_by_worker_processes(local_set, s3_proxy, fast_retries, tmp_path):
    """The same outage met by 2 DataLoader worker processes (each with its own client, configured by the
    environment): the workers log their retries, and the stream equals the undisturbed one."""
    upload(local_set, s3_proxy.server.endpoint)
    cfg = config()
    # One stream for both runs, as in training: the manifest is read before any fork. (s3fs is not fork-safe: a
    # bucket request of this process after forked workers may stall on its pooled connection until read_timeout.)
    stream = ShardStream(cfg, 0, 1, 2)
    reference = take(cfg, 12, workers=2, stream=stream)
    handler = logging.FileHandler(tmp_path / "workers.log")  # forked workers write their warnings here too
    logging.getLogger("trainer.data.bucket").addHandler(handler)
    try:
        it = iter(loader(cfg, workers=2, stream=stream, timeout=120))  # a stuck worker fails instead of hanging
        got = [next(it)]
        thread = outage(s3_proxy, local_set, lambda: "retrying" in (tmp_path / "workers.log").read_text())
        got += [next(it) for _ in range(len(reference) - 1)]
        thread.join()
        del it  # stop the workers
    finally:
        logging.getLogger("trainer.data.bucket").removeHandler(handler)
        handler.close()
    assert not thread.failures, thread.failures
    assert_same_batches(got, reference)
    assert all(not b["skipped"] for b in got), [b["skipped"] for b in got]


def test_throttling_is_retried_and_loses_nothing(local_set, s3_proxy, fast_retries, caplog):
    """503 SlowDown on 5 object reads mid-stream: each is one counted retry of the loader; nothing lost."""
    upload(local_set, s3_proxy.server.endpoint)
    cfg = config()
    reference = take(cfg, 12)
    before = retries()
    it = iter(loader(cfg))
    got = [next(it) for _ in range(2)]
    s3_proxy.throttle(5)
    got += [next(it) for _ in range(len(reference) - 2)]
    assert s3_proxy.throttled == 5
    assert retries() - before == 5
    assert "SlowDown" in caplog.text or "reduce your request rate" in caplog.text
    assert_same_batches(got, reference)
    assert all(not b["skipped"] for b in got)


# --- bad objects: counted and skipped, the stream goes on --------------------------------------------------------

@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_shard_is_counted_and_skipped(local_set, s3_server, fast_retries, caplog, cut):
    """A shard object cut short inside a member's data, or exactly at a header boundary (where Python's tarfile
    alone would end silently): the samples before the cut arrive, the shard is counted as unreadable and named in
    a warning, every other sample arrives once."""
    import io
    import tarfile

    import fsspec

    upload(local_set, s3_server.endpoint)
    cfg = config(batch_size=1, shards_per_chunk=1)
    bad = ShardStream(cfg).assignment(0)["shards"][1]  # the 2nd shard of epoch 0 (one slot)
    full = (local_set / bad).read_bytes()
    member = tarfile.open(fileobj=io.BytesIO(full)).getmembers()[4]  # a member of the 2nd sample
    at = member.offset if cut == "header" else member.offset_data + 100
    fsspec.filesystem("s3", skip_instance_cache=True).pipe(f"{BUCKET_SET.split('://', 1)[1]}/{bad}", full[:at])
    caplog.set_level("WARNING", logger="trainer.data.shards")
    before = retries()
    epoch0, _ = one_epoch(cfg)
    per_shard = shard_keys(local_set)
    got = Counter(keys(epoch0))
    intact = {k for name, ks in per_shard.items() if name != bad for k in ks}
    assert set(got.values()) == {1} and intact <= set(got)
    assert per_shard[bad][0] in got and set(got) - intact < set(per_shard[bad])  # what came before the cut
    delivered = len(set(got) - intact)
    assert epoch0[-1]["skipped"] == {"unreadable shard": len(per_shard[bad]) - delivered}  # the samples it lost
    assert epoch0[-1]["lost"] == {f"{BUCKET_SET}/{bad}": len(per_shard[bad]) - delivered}
    assert f"skipped unreadable shard ({BUCKET_SET}/{bad}" in caplog.text  # never silent
    assert retries() == before  # a short object is no transient error


def test_missing_shard_is_counted_with_its_url(local_set, s3_server, fast_retries, caplog):
    """A shard listed in the manifest but gone from the bucket: the exact epoch is short by exactly its samples,
    the batches' counter says one unreadable shard, the warning names it; no retries spent on it."""
    upload(local_set, s3_server.endpoint)
    import fsspec

    cfg = config(batch_size=1, shards_per_chunk=1)
    order = ShardStream(cfg).assignment(0)["shards"]
    gone = order[2]
    fsspec.filesystem("s3", skip_instance_cache=True).rm(f"{BUCKET_SET.split('://', 1)[1]}/{gone}")
    caplog.set_level("WARNING", logger="trainer.data.shards")
    before = retries()
    epoch0, first_of_next = one_epoch(cfg)
    per_shard = shard_keys(local_set)
    assert sorted(keys(epoch0)) == sorted(k for name, ks in per_shard.items() if name != gone for k in ks)
    assert len(epoch0) == 24 - len(per_shard[gone])
    assert epoch0[-1]["skipped"] == {"unreadable shard": len(per_shard[gone])}  # its samples, not 1
    assert f"skipped unreadable shard ({BUCKET_SET}/{gone}: " in caplog.text, caplog.text
    assert retries() == before
    assert first_of_next["epoch"] == 1


def test_every_cut_of_a_shard_is_seen_as_truncated(local_set):
    """The end-of-archive check behind the truncated-shard counts, on a real shard: whole (in any read sizes) it is
    complete; cut at any byte before its end-of-archive block, it is truncated (tarfile alone misses the cuts at
    header boundaries)."""
    import io
    import tarfile

    full = (local_set / "shard-000000.tar").read_bytes()

    def truncated(b: bytes, chunk: int) -> bool:
        end = bucket._TarEnd()
        for i in range(0, len(b), chunk):
            end.feed(b[i:i + chunk])
        return end.truncated()

    assert not any(truncated(full, chunk) for chunk in (1, 500, 512, 10240, len(full)))
    last = tarfile.open(fileobj=io.BytesIO(full)).getmembers()[-1]
    end_of_data = last.offset_data + -(-last.size // 512) * 512
    assert [cut for cut in range(end_of_data + 1) if not truncated(full[:cut], 1000)] == []


# --- credentials: a clear error at first contact, never the secret -----------------------------------------------

SECRET = "wrong-S3cr3t-d0-n0t-print"


def use_credentials(monkeypatch, key_id, secret):
    import fsspec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # filesystems keep the credentials they started with
    bucket._filesystem.cache_clear()


@pytest.mark.parametrize("source", [BUCKET_SET, BUCKET_SET + "/shard-{000000..000005}.tar"])
def test_wrong_credentials_name_the_bucket_and_variables_never_the_secret(local_set, s3_server, fast_retries,
                                                                         monkeypatch, caplog, source):
    upload(local_set, s3_server.endpoint)
    key = enable_auth(s3_server)
    use_credentials(monkeypatch, key["AccessKeyId"], key["SecretAccessKey"])
    assert len(data.list_shards(source)) == 6  # the right secret passes: the server really checks signatures
    use_credentials(monkeypatch, key["AccessKeyId"], SECRET)
    before = retries()
    with pytest.raises(SystemExit) as e:
        data.list_shards(source)
    msg = str(e.value)
    for needle in ("'test-bucket'", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", "or AWS_PROFILE",
                   "FSSPEC_S3_ENDPOINT_URL", "PermissionError"):
        assert needle in msg, msg
    assert retries() == before  # refused credentials are not retried
    bucket.register_fsspec_schemes()
    from webdataset.gopen import gopen

    with pytest.raises(PermissionError) as worker_error:  # what a DataLoader worker meets (counted per shard)
        gopen(f"{BUCKET_SET}/shard-000000.tar")
    assert "AWS_PROFILE" in str(worker_error.value)
    for text in (msg, repr(e.value), str(worker_error.value), caplog.text):
        assert SECRET not in text


def test_missing_credentials_name_the_variables(s3_server, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import fsspec

    fsspec.get_filesystem_class("s3").clear_instance_cache()
    with pytest.raises(SystemExit, match=r"NoCredentialsError.*AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        data.list_shards(BUCKET_SET)


# --- the classification itself, on the exceptions the client stack raises ----------------------------------------

def _translated(code: str, status: int, op: str = "GetObject"):
    """What s3fs raises for an S3 error response: botocore's ClientError translated, the ClientError as cause."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": code},
                                            "ResponseMetadata": {"HTTPStatusCode": status}}, op))


def test_error_classification():
    pytest.importorskip("s3fs")
    import aiohttp
    import botocore.exceptions as be
    from s3fs.utils import FileExpired

    transient = [be.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),  # endpoint down (refused)
                 be.ConnectTimeoutError(endpoint_url="http://x"), be.ReadTimeoutError(endpoint_url="http://x"),
                 be.ConnectionClosedError(endpoint_url="http://x"), aiohttp.ClientPayloadError("cut"),
                 aiohttp.ServerDisconnectedError(), ConnectionResetError(), TimeoutError(),
                 _translated("SlowDown", 503), _translated("ServiceUnavailable", 503), _translated("503", 503),
                 _translated("InternalError", 500), _translated("502", 502), _translated("RequestTimeout", 400)]
    permanent = [_translated("NoSuchKey", 404), _translated("404", 404, "HeadObject"), _translated("NoSuchBucket", 404),
                 _translated("InvalidAccessKeyId", 403), _translated("SignatureDoesNotMatch", 403),
                 _translated("403", 403, "HeadObject"), _translated("ExpiredToken", 400),
                 _translated("InvalidRange", 416), be.NoCredentialsError(), be.ProfileNotFound(profile="x"),
                 FileExpired("b/k", "etag"), bucket.BadObjectError(errno.EIO, "truncated")]
    assert [type(e).__name__ for e in transient if not bucket.is_transient(e)] == []
    assert [type(e).__name__ for e in permanent if bucket.is_transient(e)] == []
    assert isinstance(_translated("SlowDown", 503), OSError) and not isinstance(transient[0], OSError)
    credentials = [e for e in permanent if bucket.is_credentials_error(e)]
    assert len(credentials) == 6  # 403s, ExpiredToken, no credentials, unknown profile


def test_retry_waits_have_full_jitter():
    """Waits are uniform draws from [0, min(backoff * 2**attempt, MAX_BACKOFF)] (full jitter), so the ranks and
    workers that met one outage do not retry in lockstep; the sleep and the generator are injected (no waiting)."""
    import random

    def flaky(fails):
        left = [fails]

        def call():
            if left[0]:
                left[0] -= 1
                raise ConnectionError("endpoint down")
            return "data"
        return call

    caps = [min(0.5 * 2 ** k, bucket.MAX_BACKOFF) for k in range(8)]
    waits = {}
    for seed in (0, 1):
        got = []
        assert bucket._with_retries(flaky(8), "test://b/x", "reading", 8, 0.5, sleep=got.append,
                                    rng=random.Random(seed)) == "data"
        ref = random.Random(seed)
        assert got == [ref.uniform(0, cap) for cap in caps]  # capped at 30 s from the 7th wait on
        waits[seed] = got
    assert waits[0] != waits[1] and sum(waits[0]) < sum(caps)  # two clients, two schedules; none is the cap
    assert isinstance(bucket._JITTER, random.SystemRandom)  # by default: forked workers draw their own


def test_data_reexports_the_bucket_names():
    """trainer.data.shards's bucket names are trainer.data.bucket's own objects: RETRIES (which trainer.data.stream reads through
    trainer.data.shards) is one Counter, not a copy."""
    assert data.RETRIES is bucket.RETRIES
    assert set(bucket.__all__) <= set(data.__all__)
    assert [n for n in bucket.__all__ if getattr(data, n) is not getattr(bucket, n)] == []
