"""Shared test fixtures (helpers they build on: tests/helpers.py). Tests run on CPU; GPU cases skip without CUDA.

Nothing here imports numpy or torch at module level: `pytest_configure` must set the thread variables before
either is first imported (by the test modules, at collection).
"""
from __future__ import annotations

import os

import pytest

# One compute thread per process, for this process and (through the environment) every child: launched ranks,
# CLIs, evaluate/export subprocesses. The suite runs 2-3 processes at once (a launcher and 2 ranks, a CLI beside the
# test, moto), each with one OpenMP/BLAS thread per core by default: more busy threads than cores, and OpenBLAS and
# OpenMP threads spin-wait for descheduled siblings. On a 2-core machine with other work running, the FID tests ran
# ~5x slower with 2 threads (test_reference_cache_is_reused_and_keyed_by_content: 97 s vs 17 s, OpenBLAS in numpy's
# Frechet distance; Inception features 12 s vs 3.6 s) and a 4-step 2-rank launch took 25 s instead of 19 s. The
# trained models are tiny, and what a second thread gains the Inception tests on an idle machine is a fraction of
# what spinning costs on a busy one. OMP_NUM_THREADS also bounds torch's MKL and numpy's OpenBLAS; set it to
# override (e.g. OMP_NUM_THREADS=2 python -m pytest).
_THREADS = pytest.StashKey[pytest.MonkeyPatch]()


def pytest_configure(config):
    config.stash[_THREADS] = mp = pytest.MonkeyPatch()
    if "OMP_NUM_THREADS" not in os.environ:
        mp.setenv("OMP_NUM_THREADS", "1")


def pytest_unconfigure(config):
    config.stash[_THREADS].undo()


@pytest.fixture
def real_faces():
    from helpers import read_real_faces

    return read_real_faces


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory):
    """The trainer tests' shard set (helpers.train_shard_set), built once per session; tests only read it."""
    from helpers import train_shard_set

    return train_shard_set(tmp_path_factory.mktemp("train-shards"))


@pytest.fixture(scope="session")
def cpu_fp16():
    """Skips the test unless DeepSpeed itself would accept an fp16 config on the CPU accelerator the launched ranks
    use (the same check its engine makes: helpers.deepspeed_cpu_fp16)."""
    from helpers import deepspeed_cpu_fp16

    supported, reason = deepspeed_cpu_fp16()
    if not supported:
        pytest.skip(f"{reason}: an fp16 launch would stop with 'Type fp16 is not supported on your device'")


# --- a real S3 endpoint on 127.0.0.1: moto's server in a subprocess ----------------------------------------------

@pytest.fixture
def s3_server(monkeypatch):
    """Environment of a user pointed at an S3-compatible store: credentials and endpoint from the standard
    variables, so child processes (workers, launchers) see them too. Yields the server."""
    from helpers import S3Server

    pytest.importorskip("s3fs")
    server = S3Server().start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", server.endpoint)
    import fsspec

    fsspec.config.set_conf_env(fsspec.config.conf)  # pick up FSSPEC_S3_* in this process too
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("test-bucket")
    try:
        yield server
    finally:
        server.stop()
        fsspec.config.conf.pop("s3", None)


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """`s3_server` behind an `S3Proxy` (helpers.S3Proxy: outages, throttling): the environment's endpoint is the
    proxy. Yields the proxy (`.server` is the moto server behind it, for uploads that must bypass it)."""
    import fsspec

    from helpers import S3Proxy

    proxy = S3Proxy(s3_server.endpoint, s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint)
    fsspec.config.set_conf_env(fsspec.config.conf)
    try:
        yield proxy
    finally:
        proxy.stop()


# --- shared DeepSpeed runs (2 CPU ranks, the real launcher) --------------------------------------------------------

@pytest.fixture(scope="session")
def zero_run(tmp_path_factory, train_shards):
    """zero_run(stage) -> the 4-step run of ZeRO `stage` (checkpoints at steps 2 and 4) trained in two invocations
    (`--until-step 2`, then a resume), made once per session and shared: test_trainer checks it, the fine-tuning,
    universal-checkpoint and export tests start from it. Tests must not write into it: `.at_step_2` is a copy of
    the run directory taken between the invocations, for tests that continue it their own way (copy it first)."""
    import shutil
    from types import SimpleNamespace

    from helpers import launch, write_config

    runs = {}

    def get(stage: int):
        if stage not in runs:
            root = tmp_path_factory.mktemp(f"zero{stage}")
            cfg, dsc = write_config(root, train_shards, steps=4, ckpt_every=2, stage=stage)
            extra = {1: "keep_last: 1", 2: "tensorboard: true"}.get(stage)  # pruning and TensorBoard ride along
            if extra:
                cfg.write_text(cfg.read_text().replace("sample_steps: 3", f"sample_steps: 3, {extra}"))
            run = root / "run"
            first = launch(cfg, dsc, run, "--until-step", 2)
            shutil.copytree(run, root / "at-step-2")
            second = launch(cfg, dsc, run)  # --resume auto
            runs[stage] = SimpleNamespace(cfg=cfg, dsc=dsc, run=run, at_step_2=root / "at-step-2",
                                          first=first, second=second)
        return runs[stage]

    return get
