"""experiments.transfer end to end at --scale smoke on the real faces of ../shared/data: every stage through the
project's own commands (pipeline.shard, the DeepSpeed launcher, trainer.evaluate), killed mid-stage and resumed,
then continued from the committed record alone in a fresh working folder."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, SHARED_DATA, launcher_env, wait_for

from experiments.transfer.report import steps_to_reach
from experiments.transfer.study import ARMS, CELEBA_TAR, LFW_TAR, SCALES

pytestmark = pytest.mark.slow


def study_env() -> dict:
    """The study runs one compute process at a time (itself evaluating, or the ranks it launches): like a user's run it
    gets every core, not the suite's one thread per process (tests/conftest.py), which doubles its Inception time."""
    env = launcher_env()
    env.pop("OMP_NUM_THREADS", None)
    return env


def study(out, record, *extra, wait=True):
    cmd = [sys.executable, "-m", "experiments.transfer", "--scale", "smoke", "--out", str(out), "--record",
           str(record), "--data", str(SHARED_DATA), *extra]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=study_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    r = subprocess.run(cmd, cwd=REPO, env=study_env(), capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def expected_keys() -> set[str]:
    s = SCALES["smoke"]
    keys = {f"floor-seed{seed}" for seed in s.seeds}
    for subset in ("10", "1"):
        for arm in s.arms:
            keys |= {f"{arm}-{subset}-step{step}-seed{s.seeds[0]}" for step in s.curve_steps(arm, subset)}
            keys |= {f"{arm}-{subset}-step{step}-seed{seed}" for step in s.headline_steps(arm, subset)
                     for seed in s.seeds[1:]}
    return keys


def test_steps_to_reach_interpolates():
    curve = [(10, 50.0), (20, 30.0), (40, 20.0)]
    assert steps_to_reach(curve, 40.0) == pytest.approx(15.0)
    assert steps_to_reach(curve, 60.0) == 10.0          # already below at the first evaluated step
    assert steps_to_reach(curve, 10.0) is None          # never reached


def test_smoke_study_kill_resume_and_continue_from_record(tmp_path):
    if not all((SHARED_DATA / name).is_file() for name in (LFW_TAR, CELEBA_TAR)):
        pytest.skip(f"{SHARED_DATA} lacks {LFW_TAR} / {CELEBA_TAR}")
    out, record = tmp_path / "work", tmp_path / "record"
    results = out / "results.json"

    def n_evals():
        return len(json.loads(results.read_text())["evals"]) if results.exists() else 0

    # killed (launcher, ranks and all) once the floor and a first model evaluation are recorded
    started = time.time()
    proc = study(out, record, wait=False)
    try:
        wait_for(lambda: n_evals() >= 3, 900, "three recorded evaluations", poll=0.5, alive=lambda: proc.poll() is None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):  # what the killed launch could not free
            if os.path.getmtime(f) >= started:
                os.unlink(f)
    assert not json.loads(results.read_text())["stages"].get("scratch-10", {}).get("done")

    log = study(out, record)                                            # the same command: it continues
    data = json.loads(results.read_text())
    assert "reference: recorded, skipped" in log
    keys = [e["key"] for e in data["evals"]]
    assert sorted(keys) == sorted(expected_keys())                      # each figure once: nothing redone twice
    assert list(data["stages"]) == ["reference", "scratch-10", "scratch-1", "pretrain-maskdm-lfw", "maskdm-lfw-10",
                                    "maskdm-lfw-1", "pretrain-dsm-lfw", "dsm-lfw-10", "dsm-lfw-1"]
    assert set(SCALES["smoke"].arms) < set(ARMS)
    for e in data["evals"]:
        assert e["n"] == SCALES["smoke"].n and e["fid"] > 0 and abs(e["kid"]) < 10, e
        if e["arm"] not in ("floor", "scratch"):
            assert e["pretrain_images"] > 0 and e["finetune_images"] == e["step"] * 8, e
    runs = data["runs"]
    # the control's pre-training ran for maskdm-lfw's training time (its --time-limit), however many steps that was
    assert runs["pretrain-dsm-lfw"]["time_limit"] == pytest.approx(runs["pretrain-maskdm-lfw"]["train_s"], abs=0.01)
    assert runs["pretrain-dsm-lfw"]["train_s"] >= runs["pretrain-dsm-lfw"]["time_limit"]
    control = out / "runs" / "pretrain-dsm-lfw" / "checkpoints" / "latest"    # recorded at the step it stopped at
    assert control.read_text().strip() == f"step{runs['pretrain-dsm-lfw']['steps']:08d}"
    assert runs["pretrain-maskdm-lfw"]["steps"] == SCALES["smoke"].pretrain_steps
    assert data["data"]["celeba-10"] == 20 and data["data"]["celeba-1"] == 2 and data["data"]["lfw"] == 200
    for name in ("results.json", "report.md", "curves.png", "grid-scratch-10.png", "grid-maskdm-lfw-1.png"):
        assert (record / name).is_file(), name
    report = (record / "report.md").read_text()
    assert "| from scratch | 8 |" in report and "| real vs real (floor) |" in report

    # a fresh machine with only the committed record: nothing is re-trained, the report is redrawn
    log = study(tmp_path / "fresh", record)
    assert "continuing the study recorded in" in log and "$ DS_ACCELERATOR" not in log
    assert json.loads((tmp_path / "fresh" / "results.json").read_text())["evals"] == data["evals"]

    # other settings than the record's are refused, not mixed in
    r = subprocess.run([sys.executable, "-m", "experiments.transfer", "--scale", "cpu", "--out", str(tmp_path / "x"),
                        "--record", str(record), "--only", "reference"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0 and "other settings" in r.stderr and "Traceback" not in r.stderr
