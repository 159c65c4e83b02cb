"""The soak: a CPU pre-training on 2 ranks, SIGKILLed at random and resumed over and over, must lose nothing.

    flock /tmp/maskdm-heavy.lock python bench/soak.py [--minutes 20] [--seed 0] [--kill-every 60 180]
        [--restart-every 90 240] [--kinds launcher,rank] [--ckpt-every 10] [--workdir DIR]

The run: a tiny DWT model on 32 px synthetic faces, 2 CPU ranks (DS_ACCELERATOR=cpu) with 2 DataLoader workers
each, `exact` stream order over two shard sets, one on local disk and one in a bucket of a local S3 endpoint,
`data.record_keys: true` (each step's sample keys, trainer/train/keyrecord.py), a checkpoint every --ckpt-every
steps. The same `deepspeed` command is run again and again (`--resume auto`); every --kill-every seconds (uniform
between the two, seeded) the script SIGKILLs the DeepSpeed launcher or one rank (--kinds), waits for the job to
end, looks for processes of the run still alive (orphans: reported, then killed), frees DeepSpeed's /dev/shm
buffers and launches again. Every --restart-every seconds it restarts the S3 endpoint. When --minutes are up, one
last launch trains to the next checkpoint boundary (`--until-step`), then a reference run trains the same steps in
one go.

The S3 endpoint is moto's server behind a TCP relay on a fixed port. moto keeps buckets in memory and has no
persistence for them (5.x offers only a request recorder), so a restart stops both, leaves the endpoint down for
1-15 s (connections refused: the trainer's bucket retries must carry the stream over), starts a fresh moto on
another port, uploads the shard set again and only then listens on the public port again: the trainer never sees
the empty bucket a restarted moto would show.

Checks (a table; exit 1 if one fails):
- steps: each launch logged consecutive steps from the one it resumed at (metrics.jsonl, train.log_every 1);
  taking each launch's steps up to the next launch's resume step gives 1..N, each once.
- samples: each rank recorded every step 1..N; a step trained again after a kill read the same samples; in every
  epoch that all slots finished, every sample of both sets was read exactly once, in the others none twice;
  no sample skipped (metrics.jsonl `skipped_samples`); the same samples at every step as the reference run.
- weights: the final EMA (and online weights) within 1e-4 of the reference run's (weights-only loads).
- orphans: no process naming the run directory alive --grace seconds after a kill (the job must end by itself).
- checkpoints: every tag a launch resumed from had its completeness marker when it started, a launch that
  found a complete checkpoint resumed from one, and every marked tag holds each rank's files.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.train.checkpoints import COMPLETE  # noqa: E402
from trainer.train.distributed import free_port, release_shm  # noqa: E402
from trainer.train.keyrecord import read_key_records  # noqa: E402

# 4 slots (ranks x workers), each reading 3 of the 12 shards of 8 per epoch: an epoch is whole micro-batches of
# each slot, so a batch's `epoch` is every one of its samples' (the epoch check relies on it)
RANKS, WORKERS, MICRO, GLOBAL = 2, 2, 2, 8
SHARDS, SHARD_SIZE, TOL = 6, 8, 1e-4        # per set; the weights tolerance of the issue
assert 2 * SHARDS % (RANKS * WORKERS) == 0 and 2 * SHARDS // (RANKS * WORKERS) * SHARD_SIZE % MICRO == 0
SETTLE = 5  # seconds a job's processes have to end once its launcher has: those left are orphans
OUTAGE = (1, 15)  # seconds an endpoint restart keeps it down (+ moto's start): past botocore's own retries at times
BUCKET, CREDS = "soak", {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1"}

RELAY = r"""
import asyncio, sys
port, upstream = int(sys.argv[1]), int(sys.argv[2])
async def pipe(r, w):
    try:
        while data := await r.read(1 << 16):
            w.write(data)
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def handle(r, w):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
    except OSError:
        w.close()
        return
    await asyncio.gather(pipe(r, uw), pipe(ur, w))
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

CONFIG = """name: soak
model: {{preset: tiny, input: dwt, image_size: 32, patch_size: 4, overrides: {{dim: 32, heads: 2}}}}
mask: {{kind: block, rate: 0.5, block: 2}}
data: {{sources: [{local}, {bucket}], order: exact, workers: {workers}, buffer: 8, shards_per_chunk: 1,
       record_keys: true}}
optim: {{lr: 1.0e-3}}
train: {{steps: 100000000, global_batch: {glob}, micro_batch: {micro}, seed: {seed}, ema_decay: 0.99, log_every: 1,
        ckpt_every: {ckpt}, keep_last: 3, sample_every: 100000000, sample_n: 2, sample_steps: 2}}
"""

_started: list[subprocess.Popen] = []  # every process group this script started: killed on exit
_ports: list[int] = []                 # master ports: their /dev/shm buffers are released on exit
_run_dirs: list[Path] = []


def say(msg: str) -> None:
    print(msg, flush=True)


def spawn(cmd, **kw) -> subprocess.Popen:
    p = subprocess.Popen(cmd, start_new_session=True, **kw)  # its own process group: killpg reaches all of it
    _started.append(p)
    return p


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the process group `p` leads, then forget it (its id may be reused once the group is empty)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if p in _started:
        _started.remove(p)


# --- processes of a run (/proc) -----------------------------------------------------------------------------------

def proc_info(pid: int) -> tuple[int, str] | None:
    """(parent pid, command line) of a live process; None once it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[1]), cmd) if fields[0] != "Z" else None


def run_processes(run_dir: Path) -> dict[int, tuple[int, str]]:
    """{pid: (ppid, cmdline)} of the live processes whose command line names `run_dir` (launcher, ranks, workers)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            info = proc_info(int(entry.name))
            if info and f"--run-dir {run_dir} " in info[1] + " ":
                out[int(entry.name)] = info
    return out


def victims(run_dir: Path, kind: str, launcher: int) -> list[int]:
    """Pids of `kind` in the job: the launcher (the `deepspeed` runner), its ranks, or their DataLoader workers."""
    if kind == "launcher":
        return [launcher]
    procs = run_processes(run_dir)
    ranks = [p for p, (pp, _) in procs.items() if "deepspeed.launcher.launch" in procs.get(pp, (0, ""))[1]]
    if kind == "rank":
        return sorted(ranks)
    return sorted(p for p, (pp, _) in procs.items() if pp in ranks)


def describe(procs: dict[int, tuple[int, str]]) -> str:
    """"launch, 2 ranks, 4 workers": what the processes of a job are."""
    def kind(pid, ppid, cmd):
        if "deepspeed.launcher.runner" in cmd:
            return "launcher"
        if "deepspeed.launcher.launch" in cmd:
            return "launch"
        return "rank" if "deepspeed.launcher.launch" in procs.get(ppid, (0, ""))[1] else "worker"
    count = Counter(kind(pid, ppid, cmd) for pid, (ppid, cmd) in procs.items())
    return ", ".join(f"{n} {k}{'s' * (n > 1)}" for k, n in sorted(count.items()))


def cleanup() -> None:
    for p in reversed(_started):
        kill_group(p)
    for run_dir in _run_dirs:
        for pid in run_processes(run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for port in _ports:
        release_shm(port)


# --- data and the S3 endpoint ----------------------------------------------------------------------------------

def make_set(work: Path, name: str, seed: int) -> Path:
    """SHARDS shards of SHARD_SIZE 32 px synthetic faces (with DWT), keys prefixed by `name`."""
    from PIL import Image

    from pipeline.synthetic import synthetic_faces

    src, out = work / f"src-{name}", work / f"set-{name}"
    for i, face in enumerate(synthetic_faces(SHARDS * SHARD_SIZE, 48, seed)):
        path = src / f"{name}{i // 4:02d}" / f"img{i % 4}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face).save(path, quality=95)
    r = subprocess.run([sys.executable, "-m", "pipeline.shard", "folder", "--src", str(src), "--out", str(out),
                        "--size", "32", "--shard-size", str(SHARD_SIZE), "--workers", "1"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, f"sharding {src} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    return out


def set_keys(folder: Path) -> set[str]:
    """Every sample key of a local shard set (the name of a tar member up to its first dot, as webdataset groups)."""
    keys = set()
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys |= {m.name.split(".", 1)[0] for m in t if m.isfile()}
    return keys


class Endpoint:
    """moto's S3 server behind a TCP relay on a fixed public port (see the module docstring)."""

    def __init__(self, local_set: Path, prefix: str):
        self.port, self.local_set, self.prefix = free_port(), local_set, prefix
        self.url = f"http://127.0.0.1:{self.port}"
        self.moto = self.relay = None
        self.restarts = 0

    def start(self) -> None:
        import urllib.request

        import s3fs

        moto_port = free_port()
        self.moto = spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{moto_port}", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and self.moto.poll() is None, "moto server did not start"
                time.sleep(0.1)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=f"http://127.0.0.1:{moto_port}")
        fs.mkdir(BUCKET)
        for f in sorted(self.local_set.glob("*.tar")) + [self.local_set / "manifest.json"]:  # manifest last
            fs.put_file(str(f), f"{self.prefix}/{f.name}")
        self.relay = spawn([sys.executable, "-c", RELAY, str(self.port), str(moto_port)], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
        assert self.relay.stdout.readline().strip() == "ready", f"the S3 relay did not start on port {self.port}"

    def stop(self) -> None:
        for p in (self.relay, self.moto):
            if p is not None:
                kill_group(p)
                if p.stdout:
                    p.stdout.close()
        self.relay = self.moto = None

    def restart(self, outage: float) -> float:
        """Stop, wait `outage` s, start again; returns how long the endpoint was down."""
        down = time.monotonic()
        self.stop()
        time.sleep(outage)
        self.start()
        self.restarts += 1
        return time.monotonic() - down


# --- launches ---------------------------------------------------------------------------------------------------

def checkpoint_state(run_dir: Path) -> dict[str, dict]:
    """{tag: {"complete": marker present, "files": names}} of the run's checkpoints now."""
    root = run_dir / "checkpoints"
    return {d.name: {"complete": (d / COMPLETE).is_file(), "files": sorted(f.name for f in d.iterdir())}
            for d in sorted(root.iterdir()) if d.is_dir()} if root.is_dir() else {}


class Launch:
    """One `deepspeed` launch of the run: its output in logs/, the slice of metrics.jsonl it appended."""

    def __init__(self, args, work: Path, run_dir: Path, n: int, extra: list[str] = ()):
        self.run_dir, self.n, self.port = run_dir, n, free_port()
        self.name = f"launch {n}" if run_dir.name == "run" else f"the {run_dir.name} run"
        _ports.append(self.port)
        self.log = work / "logs" / f"{run_dir.name}-{n:03d}.log"
        self.log.parent.mkdir(exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        self.offset = metrics.stat().st_size if metrics.is_file() else 0
        self.checkpoints_at_start = checkpoint_state(run_dir)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(RANKS), "--master_port",
               str(self.port), str(REPO / "trainer" / "pretrain.py"), "--config", str(work / "soak.yaml"),
               "--deepspeed_config", str(REPO / "ds_configs" / "cpu_fp32.json"), "--run-dir", str(run_dir), *extra]
        env = {**os.environ, **CREDS, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
               "AWS_ENDPOINT_URL": args.endpoint, "FSSPEC_S3_ENDPOINT_URL": args.endpoint}
        with open(self.log, "w") as out:
            self.proc = spawn(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.started, self.killed, self.orphans, self.end = time.monotonic(), None, "", None

    def steps(self) -> list[int]:
        """The steps this launch logged (its slice of metrics.jsonl; lines cut by a kill left out)."""
        metrics = self.run_dir / "metrics.jsonl"
        with open(metrics) as f:
            f.seek(self.offset)
            text = f.read()
        steps = []
        for line in text.splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in r:
                steps.append(r["step"])
        return steps

    def resumed(self) -> tuple[str | None, int]:
        """(tag, step) this launch resumed from, from its output; (None, 0) for a fresh start."""
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.search(r'\{"resumed": "([^"]*)", "step": (\d+)', line)
            if m:
                return Path(m[1]).relative_to(self.run_dir / "checkpoints").parts[0], int(m[2])
        return None, 0

    def ended(self) -> None:
        """The job is over: free its shared memory, note where its part of metrics.jsonl ends."""
        release_shm(self.port)
        metrics = self.run_dir / "metrics.jsonl"
        self.end = metrics.stat().st_size if metrics.is_file() else 0

    def kill(self, kind: str, rng: random.Random, grace: float) -> str:
        """SIGKILL one process of `kind`, wait up to `grace` s for the job to end, record what is left (orphans),
        then kill the job's process group and free its shared memory. Returns what was killed."""
        pids = victims(self.run_dir, kind, self.proc.pid) or [self.proc.pid]
        kind = kind if pids != [self.proc.pid] or kind == "launcher" else "launcher"
        pid = rng.choice(pids)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # the whole job must end by itself: a killed rank makes the launcher end the others; a killed `deepspeed`
        # runner ends at once, and its ranks notice their launcher is gone, finish the step, save and stop
        while (self.proc.poll() is None or run_processes(self.run_dir)) and time.monotonic() < killed + grace:
            time.sleep(0.2)
        ended = time.monotonic()
        self.killed = (kind, killed - self.started, ended - killed)  # (kind, at, seconds the job took to end)
        if left := run_processes(self.run_dir):
            self.orphans = f"{describe(left)} still running {grace:g} s after the kill"
        kill_group(self.proc)
        for p in run_processes(self.run_dir):  # also those that left the process group
            os.kill(p, signal.SIGKILL)
        self.ended()
        return f"{kind} {pid}"

    def wait(self) -> int:
        """Wait for the job to end by itself; processes of it left SETTLE s later are orphans."""
        rc = self.proc.wait()
        ended = time.monotonic()
        while run_processes(self.run_dir) and time.monotonic() < ended + SETTLE:
            time.sleep(0.2)
        if left := run_processes(self.run_dir):
            self.orphans = f"{describe(left)} left {SETTLE} s after the launcher ended (exit {rc})"
        kill_group(self.proc)
        self.ended()
        return rc


def run_to_end(args, work: Path, run_dir: Path, n: int, until: int) -> Launch:
    launch = Launch(args, work, run_dir, n, ["--until-step", str(until)])
    if launch.wait() != 0:
        raise SystemExit(f"error: the launch to step {until} in {run_dir} failed; its log: {launch.log}")
    return launch


# --- checks -------------------------------------------------------------------------------------------------------

def records(launch: Launch, live: bool = False) -> list[dict]:
    """The training records this launch appended to metrics.jsonl (a line cut by a kill left out); `live`: so far,
    while it runs."""
    if live and not (launch.run_dir / "metrics.jsonl").is_file():
        return []
    with open(launch.run_dir / "metrics.jsonl", "rb") as f:
        f.seek(launch.offset)
        data = f.read() if live else f.read(launch.end - launch.offset)
    lines = data.decode(errors="replace").splitlines()
    out = []
    for line in lines:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "loss" in r:
            out.append(r)
    return out


def spans(steps) -> str:
    """[1, 2, 3, 7, 8] -> "1-3, 7-8" (first 8 spans)."""
    out, steps = [], sorted(set(steps))
    for s in steps:
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out[:8])
    return text + (" ..." if len(out) > 8 else "")


def trained(launches: list[Launch]) -> list[Launch]:
    """The launches that got as far as resuming or training (not those killed while starting)."""
    return [la for la in launches if la.resume[0] is not None or records(la)]


def check_steps(launches: list[Launch], until: int) -> tuple[list[str], dict]:
    """Each launch logged consecutive steps from its resume step; the steps that survived (those up to the next
    launch's resume step) are 1..until, each once."""
    problems, lineage, logged, launches = [], [], 0, trained(launches)
    for i, launch in enumerate(launches):
        r, steps = launch.resume[1], [rec["step"] for rec in records(launch)]
        logged += len(steps)
        if steps != list(range(r + 1, r + 1 + len(steps))):
            problems.append(f"launch {launch.n} resumed at step {r} and logged steps {spans(steps)}")
        nxt = launches[i + 1].resume[1] if i + 1 < len(launches) else until
        if nxt > max(steps, default=r):
            problems.append(f"launch {launches[i + 1].n} resumed at step {nxt}, past the last step launch "
                            f"{launch.n} logged ({max(steps, default=r)})")
        lineage += [s for s in steps if s <= nxt]
    if lineage != list(range(1, until + 1)):
        count = Counter(lineage)
        missing = set(range(1, until + 1)) - set(count)
        problems.append(f"kept steps are not 1..{until} once each: missing {spans(missing)}; "
                        f"twice {spans(s for s, k in count.items() if k > 1)}")
    return problems, {"steps": until, "replayed": logged - len(lineage)}


def check_samples(launches: list[Launch], run_dir: Path, ref_dir: Path, keys: set[str], until: int):
    """Key records: every step of each rank, repeats equal, equal to the reference; epochs read exactly once."""
    problems, kept = [], {}
    for rank in range(RANKS):
        mine = read_key_records(run_dir / "keys" / f"rank{rank}.jsonl")
        ref = read_key_records(ref_dir / "keys" / f"rank{rank}.jsonl")
        missing = [s for s in range(1, until + 1) if s not in mine]
        if missing:
            problems.append(f"rank {rank}: no key record for steps {spans(missing)}")
        other = [s for s in range(1, until + 1) if s in mine and any(b != mine[s][-1] for b in mine[s])]
        if other:
            problems.append(f"rank {rank}: steps trained again after a kill read other samples: {spans(other)}")
        unlike = [s for s in range(1, until + 1) if s in mine and mine[s][-1] != ref.get(s, [None])[-1]]
        if unlike:
            problems.append(f"rank {rank}: samples differ from the reference run at steps {spans(unlike)}")
        kept.update({(rank, s): lines[-1] for s, lines in mine.items() if s <= until})
    per_epoch, slot_epoch = {}, {}
    for (rank, _), batches in kept.items():
        for b in batches:
            per_epoch.setdefault(b["epoch"], Counter()).update(b["keys"])
            slot_epoch[rank, b["worker"]] = max(slot_epoch.get((rank, b["worker"]), 0), b["epoch"])
    finished = min(slot_epoch.values()) if len(slot_epoch) == RANKS * WORKERS else 0  # epochs 0..finished-1
    lost = twice = strange = 0
    for e, count in sorted(per_epoch.items()):
        twice += sum(k - 1 for k in count.values() if k > 1)
        strange += len(set(count) - keys)
        if e < finished:
            lost += len(keys - set(count))
    skipped = sum(records(launch)[-1].get("skipped_samples", 0) for launch in launches if records(launch))
    lost_metric = sum(records(launch)[-1].get("lost_samples", 0) for launch in launches if records(launch))
    if lost or twice or strange or skipped or lost_metric:
        problems.append(f"finished epochs missed {lost} samples; {twice} reads of a sample twice in an epoch; "
                        f"{strange} keys of no set; metrics.jsonl: {skipped} skipped, {lost_metric} lost samples")
    return problems, {"epochs": finished, "lost": lost + lost_metric, "twice": twice, "skipped": skipped,
                      "retries": sum(records(la)[-1].get("bucket_retries", 0) for la in launches if records(la))}


def check_weights(run_dir: Path, ref_dir: Path, until: int):
    """The final EMA and online weights against the reference run's, both read with weights_only=True."""
    import torch

    from trainer.train.rundir import step_tag

    def load(run: Path):
        return torch.load(run / "checkpoints" / step_tag(until) / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=True)

    try:
        a, b = load(run_dir), load(ref_dir)
    except Exception as e:  # noqa: BLE001 - reported as the check's failure
        return [f"could not read the final checkpoints weights-only: {str(e).splitlines()[0]}"], {}

    def diff(x: dict, y: dict) -> float:
        assert x.keys() == y.keys(), f"parameter names differ: {sorted(x.keys() ^ y.keys())[:4]}"
        return max((x[k].float() - y[k].float()).abs().max().item() for k in x)

    ema, online = diff(a["ema"]["shadow"], b["ema"]["shadow"]), diff(a["module"], b["module"])
    problems = [f"{name} weights differ from the reference by {d:.3g} (max abs; tolerance {TOL:g})"
                for name, d in (("EMA", ema), ("online", online)) if not d < TOL]
    return problems, {"ema_diff": ema, "online_diff": online}


def check_checkpoints(launches: list[Launch], run_dir: Path):
    """Each resume took a tag marked complete when the launch started; a launch that had one did resume; every
    marked tag (at each launch's start and at the end) holds rank 0's model states and each rank's partition."""
    problems, need = [], {"mp_rank_00_model_states.pt",
                          *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(RANKS))}
    for launch in trained(launches):
        tag, at = launch.resume[0], launch.checkpoints_at_start
        complete = [t for t, s in at.items() if s["complete"]]
        if tag is None and complete:
            problems.append(f"launch {launch.n} started afresh though {complete[-1]} was complete")
        elif tag is not None and not at.get(tag, {}).get("complete"):
            problems.append(f"launch {launch.n} resumed from {tag}, which had no {COMPLETE}")
    for when, state in [*((f"at launch {la.n}", la.checkpoints_at_start) for la in launches),
                        ("at the end", checkpoint_state(run_dir))]:
        for tag, s in state.items():
            if s["complete"] and not need <= set(s["files"]):
                problems.append(f"{tag} {when}: marked complete without {sorted(need - set(s['files']))}")
    return problems, {"resumes": sum(la.resume[0] is not None for la in launches)}


# --- the soak -----------------------------------------------------------------------------------------------------

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20, help="how long to kill and resume (default 20)")
    p.add_argument("--seed", type=int, default=0, help="the kills' and restarts' RNG, and train.seed")
    p.add_argument("--kill-every", type=float, nargs=2, default=(60, 180), metavar=("MIN", "MAX"),
                   help="seconds from a launch to its SIGKILL, uniform (default 60 180)")
    p.add_argument("--restart-every", type=float, nargs=2, default=(90, 240), metavar=("MIN", "MAX"),
                   help="seconds between S3 endpoint restarts, uniform (default 90 240)")
    p.add_argument("--kinds", default="launcher,rank", help="what to SIGKILL, drawn at random: launcher, rank, "
                   "worker (a DataLoader worker), comma-separated (default launcher,rank)")
    p.add_argument("--ckpt-every", type=int, default=10, help="train.ckpt_every (default 10)")
    p.add_argument("--grace", type=float, default=60, help="seconds a killed job has to end before what is left "
                   "counts as orphans (default 60; DeepSpeed gives a rank's peers 30 s)")
    p.add_argument("--workdir", type=Path, help="an empty or new folder for the data, runs and logs (default: a "
                   "new temporary folder; it is kept)")
    args = p.parse_args(argv)
    kinds = args.kinds.split(",")
    if not kinds or set(kinds) - {"launcher", "rank", "worker"}:
        p.error(f"--kinds {args.kinds}: choose from launcher, rank, worker")
    if not 0 < args.kill_every[0] <= args.kill_every[1] or not 0 < args.restart_every[0] <= args.restart_every[1]:
        p.error("--kill-every / --restart-every MIN MAX: 0 < MIN <= MAX")
    args.kinds = kinds
    return args


def soak(args, work: Path, run_dir: Path, endpoint: Endpoint, rng: random.Random) -> list[Launch]:
    """Launch, SIGKILL, repeat until --minutes are up; restart the endpoint meanwhile. Returns the launches."""
    launches, failures = [], 0
    start = time.monotonic()
    deadline, next_restart = start + args.minutes * 60, start + rng.uniform(*args.restart_every)
    while time.monotonic() < deadline:
        launch = Launch(args, work, run_dir, len(launches))
        launches.append(launch)
        kill_at = min(launch.started + rng.uniform(*args.kill_every), deadline)
        while launch.proc.poll() is None and time.monotonic() < kill_at:
            if time.monotonic() >= next_restart:
                before = max((r["step"] for r in records(launch, live=True)), default=0)
                down = endpoint.restart(rng.uniform(*OUTAGE))
                after = max((r["step"] for r in records(launch, live=True)), default=0)
                say(f"[{(time.monotonic() - start) / 60:5.1f} min] endpoint restarted: down {down:.0f} s, while "
                    f"launch {launch.n} went from step {before} to {after}")
                next_restart = time.monotonic() + rng.uniform(*args.restart_every)
            time.sleep(0.5)
        clock = f"[{(time.monotonic() - start) / 60:5.1f} min]"
        if launch.proc.poll() is not None:
            rc, failures = launch.wait(), failures + 1
            launch.resume = launch.resumed()
            say(f"{clock} launch {launch.n} ended by itself (exit {rc}); its log: {launch.log}")
            if failures == 3:
                raise SystemExit(f"error: 3 launches in a row failed by themselves; the last log: {launch.log}")
            continue
        failures = 0
        what = launch.kill(rng.choice(args.kinds), rng, args.grace)
        launch.resume = launch.resumed()  # after the job: an orphaned rank may print it late
        steps = [r["step"] for r in records(launch)]
        say(f"{clock} launch {launch.n}: resumed from {launch.resume[0] or 'nothing'}, trained to step "
            f"{max(steps, default=launch.resume[1])}; SIGKILL {what} after {launch.killed[1]:.0f} s; the job "
            f"ended {launch.killed[2]:.0f} s later" + (f"; ORPHANS: {launch.orphans}" if launch.orphans else ""))
    return launches


def main(argv=None) -> int:
    args = parse(argv)
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="maskdm-soak-"))).resolve()
    run_dir, ref_dir = work / "run", work / "reference"
    if run_dir.exists() or ref_dir.exists():
        raise SystemExit(f"error: --workdir {work} holds an earlier soak (run/, reference/): give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    _run_dirs.extend([run_dir, ref_dir])
    os.environ.update(CREDS)  # this process's uploads and every launch
    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally/atexit clean-up runs, as on Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (SIG_IGN)
    say(f"soak: {args.minutes:g} min, seed {args.seed}, kills every {args.kill_every[0]:g}-{args.kill_every[1]:g} s "
        f"({', '.join(args.kinds)}), endpoint restarts every {args.restart_every[0]:g}-{args.restart_every[1]:g} s; "
        f"in {work}")
    local, remote = make_set(work, "disk", args.seed), make_set(work, "bucket", args.seed + 1)
    keys = set_keys(local) | set_keys(remote)
    endpoint = Endpoint(remote, f"{BUCKET}/bucket")
    endpoint.start()
    args.endpoint = endpoint.url
    (work / "soak.yaml").write_text(CONFIG.format(local=local, bucket=f"s3://{BUCKET}/bucket", workers=WORKERS,
                                                  glob=GLOBAL, micro=MICRO, seed=args.seed, ckpt=args.ckpt_every))
    rng, t0 = random.Random(args.seed), time.monotonic()
    launches = soak(args, work, run_dir, endpoint, rng)
    soaked = time.monotonic() - t0
    done = [int(t[4:]) for t, s in checkpoint_state(run_dir).items() if s["complete"] and t[4:].isdigit()]
    until = (max(done, default=0) // args.ckpt_every + 1) * args.ckpt_every
    say(f"[{soaked / 60:5.1f} min] time is up: a last launch to step {until}, then the reference run")
    final = run_to_end(args, work, run_dir, len(launches), until)
    final.resume = final.resumed()
    launches.append(final)
    ref = run_to_end(args, work, ref_dir, 0, until)
    ref.resume = ref.resumed()
    left = {**run_processes(run_dir), **run_processes(ref_dir)}
    endpoint.stop()

    kills = Counter(la.killed[0] for la in launches if la.killed)
    results, figures = {}, {}
    for name, (problems, fig) in {
            "steps": check_steps(launches, until),
            "samples": check_samples(launches, run_dir, ref_dir, keys, until),
            "weights": check_weights(run_dir, ref_dir, until),
            "orphans": ([f"{la.name}{f', {la.killed[0]} killed' if la.killed else ''}: {la.orphans}"
                         for la in [*launches, ref] if la.orphans] + [f"at the end: {describe(left)}"] * bool(left),
                        {}),
            "checkpoints": check_checkpoints(launches, run_dir)}.items():
        results[name] = problems
        figures.update(fig)
    say("")
    say(f"minutes of kills   {soaked / 60:.1f} (then {(time.monotonic() - t0 - soaked) / 60:.1f} for the last "
        f"launch and the reference)")
    say(f"launches           {len(launches)}; resumes {figures['resumes']}")
    say(f"kills              {sum(kills.values())} ({', '.join(f'{k} {n}' for k, n in sorted(kills.items()))}); "
        f"every job ended by itself at most {max((la.killed[2] for la in launches if la.killed), default=0):.0f} s "
        f"after a kill")
    say(f"endpoint restarts  {endpoint.restarts}; bucket retries {figures.get('retries', '?')}")
    say(f"steps              {until} ({figures['replayed']} trained again after kills)")
    say(f"samples            {len(keys)} per epoch, {figures['epochs']} epochs finished; lost {figures['lost']}, "
        f"read twice {figures['twice']}, skipped {figures['skipped']}")
    if "ema_diff" in figures:
        say(f"weights vs ref     EMA {figures['ema_diff']:.3g}, online {figures['online_diff']:.3g} (max abs)")
    say("")
    say(f"{'check':<12} result")
    for name, problems in results.items():
        say(f"{name:<12} {'FAIL' if problems else 'pass'}")
        for p in problems[:10]:
            say(f"{'':<12}   {p}")
    say(f"\nrun directories and logs: {work}")
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted: the soak's processes are stopped; its working folder is kept")
        sys.exit(130)
    finally:
        cleanup()
