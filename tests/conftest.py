"""Shared test fixtures. Tests run on CPU; GPU cases skip without CUDA."""
from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (CI and developer machines); override with MASKDM_SHARED_DATA.
SHARED_DATA = Path(os.environ.get("MASKDM_SHARED_DATA", REPO.parent / "shared" / "data"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
    from trainer.loop import release_shm as release

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


def read_real_faces(n: int, tar_name: str = "lfw-deepfunneled.tar") -> list[np.ndarray]:
    """The first n JPEGs of a real face archive in ../shared/data as uint8 (H, W, 3) arrays (read, never copied)."""
    from PIL import Image

    path = SHARED_DATA / tar_name
    if not path.exists():
        pytest.skip(f"real face data not found at {path} (set MASKDM_SHARED_DATA)")
    images = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                data = tar.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(images) == n:
                    break
    return images


@pytest.fixture
def real_faces():
    return read_real_faces


# --- a real S3 endpoint on 127.0.0.1: moto's server in a subprocess ----------------------------------------------

class S3Server:
    """moto's S3-compatible server as a child process on a free 127.0.0.1 port; `stop()`/`start()` simulate an
    outage (the in-memory buckets are lost on restart)."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        import subprocess
        import sys
        import time
        import urllib.request

        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def s3_server(monkeypatch):
    """Environment of a user pointed at an S3-compatible store: credentials and endpoint from the standard
    variables, so child processes (workers, launchers) see them too. Yields the server."""
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
        import sys

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
        import json
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint}/__proxy__/state", data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def throttle(self, n: int) -> None:
        self._control(str(n).encode())

    @property
    def throttled(self) -> int:
        return self._control()["throttled"]


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """`s3_server` behind an `S3Proxy`: the environment's endpoint is the proxy. Yields the proxy (`.server` is the
    moto server behind it, for uploads that must bypass it)."""
    import fsspec

    proxy = S3Proxy(s3_server.endpoint, s3_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", proxy.endpoint)
    fsspec.config.set_conf_env(fsspec.config.conf)
    try:
        yield proxy
    finally:
        proxy.stop()
