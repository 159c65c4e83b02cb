"""Scheduled pre-training of public checkpoints: run this from cron or a recurring Slurm job.

    python -m trainer.schedule --config configs/vggface2_pretrain_S.yaml --deepspeed_config ds_configs/zero2_fp16.json \
        --run-dir /shared/runs/vggface2-S --every 50000 --publish s3://bucket/models/vggface2-S \
        [--ref s3://bucket/shards/celebahq-train --eval-n 10000 --eval-steps 100] \
        [--launcher "deepspeed --num_gpus 8"] [--set section.key=value ...]

Each invocation does at most one milestone (M = a multiple of --every, or the run's last step):
1. If the latest checkpoint is a milestone that is not yet published (a previous invocation was killed after
   training), it goes straight to 3.
2. Otherwise it trains from the latest checkpoint up to the next milestone: `LAUNCHER trainer/pretrain.py
   --until-step M` (the trainer resumes exactly and stops cleanly at M, saving checkpoint stepM).
3. Evaluates checkpoint M against --ref (FID/KID, `trainer.evaluate`: result appended to the run's metrics.jsonl,
   so it lands in the model card), exports its EMA weights (`trainer.export`, --dtype) and publishes them to
   PUBLISH/stepM; then points PUBLISH/latest.json at it and records it in RUN_DIR/published.json.
Idempotent: a milestone in published.json is never redone, and publishing the same bytes again uploads nothing,
so a killed invocation is simply run again. Two invocations never run at once (RUN_DIR/schedule.lock, flock;
a second one exits 0 saying so), nor one beside a training that holds the run directory (RUN_DIR/run.lock). When
the run has published its last step, invocations do nothing. Each child runs in its own process group: SIGTERM or
SIGINT to the schedule is passed to every process of the child, and the schedule (holding its lock) waits until
the last of them has ended: a training finishes its step and saves first. A run stopped by a non-finite loss
(checkpoint nonfinite-stepN) is not continued: the schedule exits 1 saying how to resume it by hand.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time

from pipeline.credentials import refuse_url_credentials
from trainer.core.settings import EXPORT_DTYPES, SamplingConfig
from trainer.train.checkpoints import divergence, latest_tag
from trainer.train.jobs import REPO, run_group
from trainer.train.rundir import RunDir, lock_schedule, step_tag, tag_step

__all__ = ["next_action", "main"]


def next_action(run: RunDir, every: int, total_steps: int) -> tuple[str, int]:
    """("publish", M) when the latest checkpoint is an unpublished milestone; ("train", M) for the next
    milestone; ("done", last) when the last step is published."""
    step = tag_step(latest_tag(run.checkpoints))
    published = run.published()
    milestone = step == total_steps or (step > 0 and step % every == 0)
    if milestone and str(step) not in published:
        return "publish", step
    if step >= total_steps:
        return "done", step
    return "train", min((step // every + 1) * every, total_steps)


def _evaluated(run: RunDir, step: int, sampling: SamplingConfig) -> bool:
    """An evaluation of checkpoint `step` with these settings is already in metrics.jsonl (a killed invocation
    got that far): evaluating again would only add a second record."""
    return any(r.get("eval") and r.get("step") == step and r.get("n") == sampling.n and r.get("steps") == sampling.steps
               for r in run.read_metrics())


def _run(cmd: list[str], what: str, env=None) -> None:
    print(f"[schedule] {what}: {shlex.join(cmd)}", flush=True)
    code, stopped_by = run_group(cmd, env)  # returns once every process of the child has ended
    if stopped_by is not None:
        raise SystemExit(f"[schedule] stopped by {signal.Signals(stopped_by).name} during {what}; every process of "
                         f"it has ended. Run the schedule again to continue from the latest checkpoint")
    if code != 0:
        raise SystemExit(f"error: {what} failed (exit {code}); nothing was published. Run the schedule "
                         f"again once fixed: it continues from the latest checkpoint")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainer.schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--every", type=int, required=True, help="milestone spacing in optimiser steps")
    p.add_argument("--publish", required=True, help="URL prefix; milestone M goes to PUBLISH/stepM")
    p.add_argument("--launcher", default="deepspeed", help='training launcher command, e.g. "deepspeed '
                   '--num_gpus 8" or "deepspeed --hostfile hosts" (default: deepspeed, all local GPUs)')
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--ref", help="reference set for FID/KID at each milestone (skipped without it)")
    p.add_argument("--eval-n", type=int, default=10_000)
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--eval-metrics", default="fid,kid")
    p.add_argument("--dtype", default="fp16", choices=EXPORT_DTYPES, help="exported weights")
    args = p.parse_args(argv)
    if args.every < 1:
        raise SystemExit("error: --every must be >= 1")
    for flag, url in (("--publish", args.publish), ("--ref", args.ref or "")):
        refuse_url_credentials(url, flag)  # before training: both are printed and the URL lands in the model card
    try:  # the milestones' evaluation: DDIM, eta 1 (SamplingConfig's defaults)
        sampling = SamplingConfig(n=args.eval_n, steps=args.eval_steps)
    except ValueError as e:
        raise SystemExit(f"error: --eval-n / --eval-steps: {e}") from None
    from trainer.train.cli import load

    run = RunDir(args.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    cfg, _ = load(argparse.Namespace(config=args.config, deepspeed_config=args.deepspeed_config, set=args.set))
    lock, busy = lock_schedule(run)  # held until this process ends
    if busy:
        print(f"[schedule] {busy}: nothing to do", flush=True)
        return
    if why := divergence(run.checkpoints):  # a non-finite loss stopped the run: not for a schedule to continue
        raise SystemExit(why)
    action, milestone = next_action(run, args.every, cfg.train.steps)
    if action == "done":
        print(f"[schedule] {run.root}: step {milestone} of {cfg.train.steps} trained and published: nothing to do")
        return
    if action == "train":
        sets = [x for s in args.set for x in ("--set", s)]
        _run([*shlex.split(args.launcher), str(REPO / "trainer" / "pretrain.py"), "--config", args.config,
              "--deepspeed_config", args.deepspeed_config, "--run-dir", str(run.root), "--until-step",
              str(milestone), *sets], f"training to step {milestone}")
        got = tag_step(latest_tag(run.checkpoints))
        if got != milestone:
            raise SystemExit(f"error: training ended at checkpoint step {got}, not the milestone {milestone}")
    tag = step_tag(milestone)
    if args.ref and not _evaluated(run, milestone, sampling):
        _run([sys.executable, "-m", "trainer.evaluate", "--ckpt", str(run.checkpoint(tag)), "--ref", args.ref,
              *sampling.to_args(), "--metrics", args.eval_metrics], f"evaluating {tag}")
    url = f"{args.publish.rstrip('/')}/{tag}"
    out = run.export_weights(tag)
    _run([sys.executable, "-m", "trainer.export", str(run.root), "--tag", tag, "--out", str(out), "--dtype",
          args.dtype, "--publish", url], f"exporting and publishing {tag}")
    from pipeline.store import Store

    digest = (out.parent / "model.safetensors.sha256").read_text().split()[0]
    record = {"url": url, "sha256": digest, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Store(args.publish).write_json("latest.json", {"step": milestone, **record})
    run.record_published(milestone, record)
    print(f"[schedule] published step {milestone}: {url}", flush=True)


if __name__ == "__main__":
    main()
