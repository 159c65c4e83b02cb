"""trainer.schedule end to end on CPU against the local S3 endpoint: two invocations train, evaluate, export and
publish successive milestones; further invocations are no-ops; a milestone trained but not published (a killed
invocation) is published without training again; a 2-rank fine-tune starts from the published URL. Without a
launch: a diverged run stops the schedule; SIGTERM reaches the schedule's child and is waited for."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import (REPO, fake_checkpoint, free_port, launch_script, launcher_env, records, release_shm,
                     wait_for, write_config)

pytestmark = pytest.mark.slow


def schedule(cfg, dsc, run, ref, *extra):
    port = free_port()
    launcher = f"{sys.executable} -m deepspeed.launcher.runner --num_gpus 2 --master_port {port}"
    cmd = [sys.executable, "-m", "trainer.schedule", "--config", str(cfg), "--deepspeed_config", str(dsc),
           "--run-dir", str(run), "--every", "2", "--publish", "s3://test-bucket/models/tiny", "--launcher", launcher,
           "--ref", str(ref), "--eval-n", "4", "--eval-steps", "2", "--eval-metrics", "fid", *extra]
    try:
        r = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    finally:
        release_shm(port)  # DeepSpeed's /dev/shm buffers, should a launch fail (helpers.release_shm)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_two_invocations_publish_two_milestones(tmp_path, train_shards, s3_server):
    import fsspec

    from trainer.weights.load import load_model

    cfg, dsc = write_config(tmp_path, train_shards, steps=4, ckpt_every=100, stage=2)
    shards = shutil.copytree(train_shards, tmp_path / "ref")  # the reference set (evaluate writes its cache there)
    run = tmp_path / "run"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    out1 = schedule(cfg, dsc, run, shards)
    assert "training to step 2" in out1 and "published step 2" in out1
    assert json.loads(fs.cat_file("test-bucket/models/tiny/latest.json"))["step"] == 2
    out2 = schedule(cfg, dsc, run, shards)
    assert "training to step 4" in out2 and "published step 4" in out2
    latest = json.loads(fs.cat_file("test-bucket/models/tiny/latest.json"))
    assert latest["step"] == 4 and latest["url"] == "s3://test-bucket/models/tiny/step00000004"
    model, config, meta = load_model(latest["url"])
    assert meta["step"] == 4 and "fid" in json.dumps(meta["metrics"]["eval"])  # the evaluation is in the card
    assert sorted(json.loads((run / "published.json").read_text())) == ["2", "4"]
    assert "nothing to do" in schedule(cfg, dsc, run, shards)
    # an invocation killed after training: the milestone is published, not trained again
    published = json.loads((run / "published.json").read_text())
    del published["4"]
    (run / "published.json").write_text(json.dumps(published))
    out = schedule(cfg, dsc, run, shards)
    assert "training to" not in out and "evaluating" not in out, out
    assert "nothing uploaded" in out and "published step 4" in out, out
    # fine-tuning (2 ranks, the real launcher) from the published URL
    ft_cfg = tmp_path / "ft.yaml"
    ft_cfg.write_text(cfg.read_text().replace("rate: 0.5", "rate: 0.0").replace("steps: 4", "steps: 2"))
    r = launch_script("finetune.py", ft_cfg, dsc, tmp_path / "ft", "--init", latest["url"])
    init = next(json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"init"'))
    assert init["missing_keys"] == [] and init["unexpected_keys"] == []
    assert [x["step"] for x in records(tmp_path / "ft")] == [2]


def test_a_diverged_run_stops_the_schedule_with_how_to_resume(tmp_path, capsys):
    """A non-finite loss saved nonfinite-stepN: the schedule must not "train" it again at every invocation."""
    from trainer.schedule import main
    from trainer.train.checkpoints import mark_complete

    cfg, dsc = write_config(tmp_path, tmp_path / "shards", steps=8, ckpt_every=2, stage=1)
    ckpt = tmp_path / "run" / "checkpoints"
    for tag, step in (("step00000002", 2), ("nonfinite-step00000003", 3)):
        fake_checkpoint(ckpt, tag, ranks=2)
        mark_complete(ckpt / tag, step, 2)
    with pytest.raises(SystemExit) as e:  # `false`: a launch would fail at once
        main(["--config", str(cfg), "--deepspeed_config", str(dsc), "--run-dir", str(tmp_path / "run"), "--every",
              "2", "--publish", str(tmp_path / "published"), "--launcher", "false"])
    message = str(e.value)
    assert message.startswith(f"error: {tmp_path / 'run'} diverged: a non-finite loss stopped training at step 3 "
                              f"(checkpoint {ckpt / 'nonfinite-step00000003'}")
    assert "--resume step00000002 --set optim.lr=" in message and "\n" not in message
    assert "training to" not in capsys.readouterr().out


FAKE_LAUNCHER = """
import os, signal, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[1])
# a "rank": on SIGTERM it finishes a step and saves (a second), as the training loop does
rank = subprocess.Popen([sys.executable, "-c", '''
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
(out / "rank-started").write_text("")
while not stop:
    time.sleep(0.05)
time.sleep(1)
(out / "saved").write_text("")
''', str(out)])
time.sleep(3600)  # the runner: no SIGTERM handler, it ends at once
"""


def test_sigterm_to_the_schedule_reaches_its_training_and_waits_for_it(tmp_path):
    """The schedule runs its child in a process group of its own, passes SIGTERM to all of it, and holds its lock
    until the last process of the child has ended (a training saving its checkpoint)."""
    import signal

    cfg, dsc = write_config(tmp_path, tmp_path / "shards", steps=8, ckpt_every=2, stage=1)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "trainer.schedule", "--config", str(cfg), "--deepspeed_config", str(dsc),
           "--run-dir", str(tmp_path / "run"), "--every", "2", "--publish", str(tmp_path / "published"),
           "--launcher", f"{sys.executable} {launcher} {out}"]
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for((out / "rank-started").exists, 60, "the fake rank", alive=lambda: proc.poll() is None)
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0 and "another invocation holds" in second.stdout
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert (out / "saved").exists()  # the schedule ended after its training did
        assert proc.returncode == 1 and "stopped by SIGTERM during training to step 2" in log.read_text()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
