"""Helpers shared by the tests: tiny corpora, the DeepSpeed launcher, run directories, the local S3 endpoint.

Imported as `helpers` (pyproject's `[tool.pytest.ini_options] pythonpath = ["tests"]` puts tests/ on sys.path).
Fixtures live in conftest.py and build on these; no test imports conftest or another test file.
"""
from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.synthetic import synthetic_faces

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (CI and developer machines); override with MASKDM_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("MASKDM_SHARED_DATA", REPO.parent / "shared" / "data"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --- waiting on a condition ------------------------------------------------------------------------------------

def wait_for(condition, timeout: float, what: str, poll: float = 0.05, alive=None):
    """Poll `condition()` until it is truthy (returned) or `timeout` seconds pass (AssertionError naming `what`).
    `alive()`, when given, must stay true meanwhile (e.g. the process being watched has not exited)."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if alive is not None:
            assert alive(), f"gave up waiting for {what}: the process ended first"
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout} s"
        time.sleep(poll)


# --- ports and the DeepSpeed launcher --------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and DeepSpeed's master port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_ERRORS = ("Address already in use", "EADDRINUSE", "Connection refused", "DistNetworkError")


def release_shm(port) -> None:
    """Remove the /dev/shm buffers DeepSpeed's CPU all-reduce leaves behind for this master port (~69 MB per rank;
    killed or failed runs never free them, and a full /dev/shm ends in the OOM killer)."""
    from trainer.train.distributed import release_shm as release

    release(port)


def run_launcher(cmd: list[str], env: dict, timeout: int = 600, attempts: int = 2):
    """Run a `deepspeed` launcher command; retry (with a fresh master port) only when it failed to rendezvous
    (a port taken between our pick and its bind, a rank that could not connect), never on other failures."""
    for attempt in range(attempts):
        if attempt:
            cmd = list(cmd)
            cmd[cmd.index("--master_port") + 1] = str(free_port())
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        finally:
            release_shm(cmd[cmd.index("--master_port") + 1])
        if r.returncode == 0 or not any(e in r.stdout + r.stderr for e in RENDEZVOUS_ERRORS):
            return r
    return r


def launcher_env() -> dict:
    """The environment of a launched CPU job: this process's (monkeypatched variables included) + the accelerator."""
    return {**os.environ, "DS_ACCELERATOR": "cpu"}


_FP16_PROBE = ("from deepspeed.accelerator import get_accelerator; a = get_accelerator(); "
               "print(a._name, bool(a.is_fp16_supported()))")


@functools.cache
def deepspeed_cpu_fp16() -> tuple[bool, str]:
    """(supported, reason): DeepSpeed's own fp16 check, `get_accelerator().is_fp16_supported()`, which its engine
    asserts for an fp16 config ("Type fp16 is not supported on your device"), asked of the accelerator the launched
    ranks get (DS_ACCELERATOR=cpu) in a child process: importing DeepSpeed's accelerator here would fix this
    process's choice. Cached: one probe per test session."""
    r = subprocess.run([sys.executable, "-c", _FP16_PROBE], env=launcher_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"the DeepSpeed accelerator probe failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
    name, supported = r.stdout.split()[-2:]
    assert name == "cpu", f"DS_ACCELERATOR=cpu gave DeepSpeed's {name!r} accelerator"
    return supported == "True", (f"DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, as the launched ranks use) "
                                 f"reports is_fp16_supported() = {supported} on this CPU")


# --- real face data --------------------------------------------------------------------------------------------

def _real_face_jpegs(n: int, tar_name: str):
    """(member name, JPEG bytes) of the first n JPEGs of a real face archive in ../shared/data (skip without it)."""
    path = SHARED_DATA / tar_name
    if not path.exists():
        pytest.skip(f"real face data not found at {path} (set MASKDM_SHARED_DATA)")
    with tarfile.open(path) as tar:
        found = 0
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                yield member.name, tar.extractfile(member).read()
                found += 1
                if found == n:
                    return


def read_real_faces(n: int, tar_name: str = "lfw-deepfunneled.tar") -> list[np.ndarray]:
    """The first n JPEGs of a real face archive in ../shared/data as uint8 (H, W, 3) arrays (read, never copied)."""
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in _real_face_jpegs(n, tar_name)]


def real_faces_folder(dest: Path, n: int, tar_name: str = "lfw-deepfunneled.tar") -> Path:
    """The first n JPEGs of a real face archive written under `dest` with their archive paths (a folder corpus)."""
    for name, data in _real_face_jpegs(n, tar_name):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return dest


# --- tiny corpora (written into tmp_path, never committed) -----------------------------------------------------

def jpeg_bytes(arr: np.ndarray | Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def identity_tree(root: Path, identities: int = 3, per_identity: int = 4, size: int = 160, seed: int = 0) -> Path:
    """root/idNNN/img_MM.jpg good synthetic faces."""
    faces = synthetic_faces(identities * per_identity, size, seed)
    for i, face in enumerate(faces):
        write(root / f"id{i // per_identity:03d}" / f"img_{i % per_identity:02d}.jpg", jpeg_bytes(face))
    return root


def bad_inputs(root: Path) -> dict[str, str | None]:
    """Every awkward input of the issue, under root/odd/. Returns {relative path: expected skip reason or None
    when the input must be handled (become a sample)}."""
    face = synthetic_faces(1, 200, seed=9)[0]
    good = jpeg_bytes(face)
    cases = {}

    def add(name, data, reason):
        write(root / "odd" / name, data)
        cases[f"odd/{name}"] = reason

    add("truncated.jpg", good[: len(good) // 2], "truncated or corrupt image")
    add("zero.jpg", b"", "empty file")
    add("text.png", b"this is not an image at all\n" * 10, "not an image")
    add("cmyk.jpg", jpeg_bytes(Image.fromarray(face).convert("CMYK")), None)
    add("grey.jpg", jpeg_bytes(face[..., 0]), None)
    add("palette.png", png_bytes(Image.fromarray(face).convert("P", palette=Image.ADAPTIVE, colors=256)), None)
    rgba = np.dstack([face, np.full(face.shape[:2], 255, np.uint8)])
    rgba[:50, :50, 3] = 0  # a transparent corner -> white
    add("rgba.png", png_bytes(Image.fromarray(rgba, "RGBA")), None)
    add("deep16.png", png_bytes(Image.fromarray((np.arange(200 * 200).reshape(200, 200) % 65536).astype(np.uint16))),
        None)
    # EXIF orientation 6: stored 240x120 (left red, right blue), displayed rotated 90 deg clockwise: 120x240 with
    # red on top and blue below.
    stored = np.zeros((120, 240, 3), np.uint8)
    stored[:, :120] = (255, 0, 0)
    stored[:, 120:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    add("rotated.jpg", jpeg_bytes(stored, exif=exif.tobytes()), None)
    add("tiny.jpg", jpeg_bytes(face[:16, :16]), "too small")
    add("huge.png", png_bytes(Image.new("L", (1200, 1000))), "too large (decompression bomb)")  # with --max-pixels
    add("dup.jpg", good, None)
    add("dup.png", png_bytes(Image.fromarray(face)), "duplicate key")  # same key as dup.jpg: the second is skipped
    return cases


def vggface2_tree(root: Path, seed: int = 0) -> Path:
    """ROOT/train/nXXXXXX/NNNN_NN.jpg, bb_landmark/loose_bb_train.csv (with a malformed row, a box outside
    its image and an image without a box) and identity_meta.csv with quoted names holding commas."""
    faces = synthetic_faces(6, 200, seed)
    names = []
    for i, face in enumerate(faces):
        ident = f"n{(i // 3) + 1:06d}"
        name = f"{ident}/{i % 3 + 1:04d}_01"
        write(root / "train" / f"{name}.jpg", jpeg_bytes(face))
        names.append(name)
    rows = ["NAME_ID,X,Y,W,H",
            f'"{names[0]}",60,50,80,100',
            f'"{names[1]}",150,150,120,120',  # extends past the image: padded
            f'"{names[2]}",5000,5000,50,50',  # entirely outside: skipped
            f'"{names[3]}",abc,1,2,3',        # malformed row: skipped, and the image then has no box
            f'"{names[4]}",40,40,100,110',
            f'"{names[5]}",nan,10,40,40',     # not finite: malformed, and names[5] has no box: fallback
            "garbage line without fields"]    # malformed: skipped
    write(root / "bb_landmark" / "loose_bb_train.csv", ("\n".join(rows) + "\n").encode())
    meta = ['Class_ID, Name, Sample_Num, Flag, Gender', 'n000001, "Doe, Jane", 3, 1, f',
            'n000002, "Roe, Richard", 3, 1, m']
    write(root / "identity_meta.csv", ("\n".join(meta) + "\n").encode())
    return root


def celebahq_tree(root: Path, n: int = 6, size: int = 256) -> Path:
    """CelebA-HQ-img/{0..n-1}.jpg plus the mapping and partition lists (0,1 train; 2,3 val; 4,5 test)."""
    for i, face in enumerate(synthetic_faces(n, size, seed=3)):
        write(root / "CelebA-HQ-img" / f"{i}.jpg", jpeg_bytes(face, quality=95))
    mapping = ["idx         orig_idx    orig_file"] + [f"{i} {1000 + i} {1001 + i:06d}.jpg" for i in range(n)]
    write(root / "CelebA-HQ-to-CelebA-mapping.txt", ("\n".join(mapping) + "\n").encode())
    part = [f"{1001 + i:06d}.jpg {min(i // 2, 2)}" for i in range(n)]
    write(root / "list_eval_partition.txt", ("\n".join(part) + "\n").encode())
    return root


def jpeg_shard_set(root: Path, identities: int, per_identity: int, size: int, crop: int, shard_size: int) -> Path:
    """ROOT/shards: an identity tree of synthetic faces (ROOT/src, `size` px) sharded as `crop` px crops without
    DWT, `shard_size` samples per shard."""
    from pipeline.shard import main as shard_main

    identity_tree(root / "src", identities=identities, per_identity=per_identity, size=size)
    shard_main(["folder", "--src", str(root / "src"), "--out", str(root / "shards"), "--size", str(crop), "--no-dwt",
                "--shard-size", str(shard_size)])
    return root / "shards"


def train_shard_set(root: Path) -> Path:
    """The trainer tests' shard set: 32 synthetic faces (4 identities), 16 px crops, no DWT, 8 shards of 4."""
    return jpeg_shard_set(root, identities=4, per_identity=8, size=48, crop=16, shard_size=4)


# --- trainer runs: configs, launches, what a run leaves ----------------------------------------------------------

def write_config(folder: Path, shards, steps, ckpt_every, stage, name: str = "cfg"):
    """A tiny pixel-mode experiment (16 px, dim 32, 2 heads; global batch 8 = 2 ranks x micro 2 x 2 accumulation)
    and a CPU fp32 DeepSpeed config at ZeRO `stage`. Returns (experiment yaml, ds json)."""
    cfg = folder / f"{name}.yaml"
    cfg.write_text(f"""name: test
model: {{preset: tiny, input: pixel, image_size: 16, patch_size: 4, overrides: {{dim: 32, heads: 2}}}}
mask: {{kind: block, rate: 0.5, block: 2}}
data: {{sources: [{shards}], order: resampled, workers: 0, buffer: 8}}
optim: {{lr: 1.0e-3}}
train: {{steps: {steps}, global_batch: 8, micro_batch: 2, log_every: 2, ckpt_every: {ckpt_every},
        sample_every: 1000, sample_n: 4, sample_steps: 3}}
""")
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    dsc = folder / f"{name}-ds{stage}.json"
    dsc.write_text(json.dumps(ds))
    return cfg, dsc


def launch_script(script, cfg, dsc, run_dir, *extra, wait=True, check=True, num_gpus=2, output=None):
    """`deepspeed --num_gpus N trainer/SCRIPT --config CFG --deepspeed_config DSC --run-dir RUN EXTRA` on CPU
    (SCRIPT relative to trainer/, or a path). wait=False: the Popen, in its own session (kill the whole job with
    `kill_job`), its output to the file `output` if given."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
           "--master_port", str(free_port()),
           str(REPO / "trainer" / script), "--config", str(cfg), "--deepspeed_config", str(dsc),
           "--run-dir", str(run_dir), *map(str, extra)]
    if not wait:
        out = open(output, "w") if output else subprocess.DEVNULL
        return subprocess.Popen(cmd, env=launcher_env(), stdout=out, stderr=subprocess.STDOUT if output else out,
                                start_new_session=True)
    r = run_launcher(cmd, launcher_env(), timeout=600)
    assert r.returncode == 0 or not check, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def launch(cfg, dsc, run_dir, *extra, wait=True, check=True):
    return launch_script("pretrain.py", cfg, dsc, run_dir, *extra, wait=wait, check=check)


def job_processes(pgid: int) -> list[int]:
    """The live processes (not zombies) of a launched job's session (`launch(..., wait=False)`: pgid = its pid)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text() if d.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def kill_job(proc) -> None:
    """SIGKILL every process of a job launched with wait=False, and free its /dev/shm buffers."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    release_shm(proc.args[proc.args.index("--master_port") + 1])


def records(run_dir):
    """The training records of metrics.jsonl (not the sample-grid entries)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def final_state(run_dir, tag):
    """Rank 0's model-states file (ZeRO-3 names it per rank): module weights (not under ZeRO-3) + client state."""
    folder = Path(run_dir) / "checkpoints" / tag
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    path = next(folder / n for n in names if (folder / n).exists())
    return torch.load(path, weights_only=False)


def enable_auth(server) -> dict:
    """An IAM user with full access on the local S3 endpoint; from then on moto checks every request's signature
    against IAM (so wrong or missing credentials are refused as by a real bucket). Returns the user's access key."""
    import urllib.request

    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint)
    iam.create_user(UserName="user")
    key = iam.create_access_key(UserName="user")["AccessKey"]
    iam.put_user_policy(UserName="user", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    req = urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    assert json.loads(urllib.request.urlopen(req).read())["status"] == "ok"
    return key


def fake_run(root: Path, input_mode: str = "pixel") -> Path:
    """A run directory as the training loop leaves it (rank 0's model states with the EMA and the config)."""
    from trainer.core.models import build_model
    from trainer.train.config import ExperimentConfig

    cfg = ExperimentConfig.from_dict({
        "model": {"preset": "tiny", "input": input_mode, "image_size": 16, "patch_size": 4,
                  "overrides": {"dim": 32, "heads": 2}},
        "mask": {"block": 1},  # DWT mode: a 2x2 token grid
        "train": {"schedule": "cosine", "global_batch": 8, "micro_batch": 4}})
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m.preset, m.in_channels, m.model_size, m.patch_size, **m.overrides)
    with torch.no_grad():  # a non-trivial output layer (it starts at zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tag = root / "checkpoints" / "step00000003"
    tag.mkdir(parents=True)
    torch.save({"step": 3, "config": cfg.to_dict(),
                "ema": {"decay": 0.999, "shadow": {k: v.clone() for k, v in model.state_dict().items()}}},
               tag / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text("step00000003")
    return root


def fake_checkpoint(ckpt_dir, tag, ranks):
    """An (empty) DeepSpeed checkpoint folder written by `ranks` ranks, named by `latest`."""
    (ckpt_dir / tag).mkdir(parents=True)
    for r in range(ranks):
        (ckpt_dir / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (ckpt_dir / "latest").write_text(tag)


# --- a real S3 endpoint on 127.0.0.1: moto's server in a subprocess ----------------------------------------------

class S3Server:
    """moto's S3-compatible server as a child process on a free 127.0.0.1 port; `stop()`/`start()` simulate an
    outage (the in-memory buckets are lost on restart)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        import urllib.request

        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up():
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return True
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_for(up, 30, f"moto server on port {self.port}", poll=0.1, alive=lambda: self.proc.poll() is None)
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


# --- fault injection in front of the S3 endpoint: outages and throttling ----------------------------------------

# The proxy runs as its own process (stdlib only, starts in ~0.1 s): DataLoader workers forked by a test never
# inherit its sockets, and stopping it closes its port and connections the way a stopped endpoint does.
PROXY_SCRIPT = r"""
import http.client, http.server, json, sys, threading

port, upstream = int(sys.argv[1]), sys.argv[2]
SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b'<Message>Please reduce your request rate.</Message><RequestId>maskdm-test</RequestId></Error>')
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade"}
state, lock = {"to_throttle": 0, "throttled": 0, "forwarded": 0}, threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, *args):
        pass

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/__proxy__/"):  # control: no S3 bucket name has underscores
            with lock:
                if self.command == "POST":
                    state["to_throttle"] = int(body)
                data = json.dumps(state).encode()
            return self.reply(200, [("Content-Type", "application/json")], data)
        with lock:
            throttle = self.command == "GET" and "Range" in self.headers and state["to_throttle"] > 0
            if throttle:
                state["to_throttle"] -= 1
                state["throttled"] += 1
        if throttle:
            return self.reply(503, [("Content-Type", "application/xml")], SLOWDOWN)
        conn = http.client.HTTPConnection(upstream, timeout=30)
        try:
            conn.request(self.command, self.path, body=body or None,
                         headers={k: v for k, v in self.headers.items() if k.lower() not in HOP})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        with lock:
            state["forwarded"] += 1
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP
                   and (self.command == "HEAD" or k.lower() != "content-length")]
        self.reply(resp.status, headers, data)

    def reply(self, status, headers, data):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD" or not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward


httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
httpd.daemon_threads = True
print("ready", flush=True)
httpd.serve_forever()
"""


class S3Proxy:
    """A small HTTP proxy process on 127.0.0.1 in front of an S3 endpoint (clients point their endpoint URL at it).
    `throttle(n)`: the next n object reads (GETs with a Range header) are answered 503 SlowDown, as S3 does when a
    prefix is over its request rate; `throttled`: how many were. `stop()` ends the process (its port refuses
    connections, its connections are closed: the endpoint is down); `start()` listens on the same port again."""

    def __init__(self, upstream: str, server: S3Server | None = None):
        self.upstream = upstream.split("://", 1)[1]  # host:port
        self.server = server  # the S3Server behind it, when there is one
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", PROXY_SCRIPT, str(self.port), self.upstream],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.wait(timeout=10)
            raise RuntimeError(f"S3 proxy did not start on port {self.port}")
        return self

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc.stdout.close()
            self.proc = None

    def _control(self, data: bytes | None = None) -> dict:
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/__proxy__/state", data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def throttle(self, n: int) -> None:
        self._control(str(n).encode())

    @property
    def throttled(self) -> int:
        return self._control()["throttled"]
