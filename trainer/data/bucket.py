"""Bucket access for the streaming loader: webdataset opens `s3://`, `gs://`, ... URLs through fsspec.

`register_fsspec_schemes()`: webdataset 1.0 opens bucket URLs through fsspec (one filesystem per process) as
`ResumableObject`s, instead of `pipe:` subprocesses (docs/design.md); faults: see below. `trainer.data.shards` (shard lists,
decoding, batching) uses this module and re-exports its public names.

Bucket configuration (standard fsspec / s3fs / botocore; nothing maskdm-specific):
- Credentials: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN), or AWS_PROFILE (a profile in
  ~/.aws/credentials or ~/.aws/config: keys, SSO, assume-role), or the instance/pod role.
- S3-compatible stores (MinIO, Ceph, R2, ...): the endpoint in FSSPEC_S3_ENDPOINT_URL (fsspec) or AWS_ENDPOINT_URL
  (botocore), the region in AWS_DEFAULT_REGION.
- Any s3fs.S3FileSystem argument: FSSPEC_S3_<ARG>=value (a string), or FSSPEC_S3='<json dict>', e.g.
  FSSPEC_S3='{"config_kwargs": {"read_timeout": 60, "max_pool_connections": 32}}'; a JSON file in
  $FSSPEC_CONFIG_DIR (~/.config/fsspec); or `fsspec.config.conf["s3"] = {...}` in Python before the stream starts
  (forked workers inherit it). Environment variables reach every rank and worker; prefer them on clusters.
- Below the loader, botocore retries connection errors and 503s itself (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE; by default
  an unreachable endpoint surfaces after ~5-12 s) and s3fs retries 503 SlowDown (5 times): short blips never
  reach the loader's counter.

Bucket faults, as the stream meets them (the batches carry `skipped`: counts by reason, per worker):
- Transient: the endpoint unreachable, refusing or dropping connections (botocore EndpointConnectionError,
  ConnectionClosedError: not OSErrors), timeouts, throttling (503 SlowDown: s3fs raises OSError EBUSY), other 5xx
  and 429. Retried with exponential backoff and full jitter: $MASKDM_BUCKET_RETRIES retries (default 7), the wait
  before retry k drawn uniformly from [0, min(b * 2**k, 30 s)] with b = $MASKDM_BUCKET_BACKOFF (0.5 s): ~30 s of
  outage on average (at most ~60 s), and the ranks and workers of a job that met the same outage do not come back
  to the endpoint in lockstep (the draws come from the operating system: forked workers do not share them).
  Each retry is counted in `RETRIES` (this process, by protocol) and logged (one warning per 30 s, with the
  totals). A failure in the middle of a shard reopens the object and reads on from the same byte, if its size and
  ETag are unchanged: nothing is lost and the sample order is that of an undisturbed stream.
- Missing object or bucket (FileNotFoundError): not retried; the shard's samples are counted as "unreadable
  shard" and the warning names its URL; the stream goes on (an exact epoch is short by exactly that shard's samples).
- Truncated shard (even when cut at a tar header boundary, where tarfile alone would end silently) or an object
  replaced while read (BadObjectError): "unreadable shard"; the samples before the cut are delivered.
- Refused or missing credentials (PermissionError from 403 AccessDenied / InvalidAccessKeyId /
  SignatureDoesNotMatch / ExpiredToken; botocore NoCredentialsError, ProfileNotFound): never retried.
  `trainer.data.shards.list_shards` is the first contact (the manifest, or a pattern's first shard): it stops the run
  (SystemExit) naming the bucket, the variables to set and which of them are set, never their values (secrets are
  scrubbed): the message of `pipeline.credentials`, which every command touching a bucket prints the same way.
  A worker meeting it counts the shard as unreadable with the same message.
- $MASKDM_BUCKET_BLOCK_SIZE: bytes fetched per request for an open shard (readahead; default 8 MiB).
`register_fsspec_schemes(retries, backoff, block_size)` overrides the variables in the calling process only;
workers (which call it without arguments) read the environment. fsspec's async filesystems are not fork-safe
(fsspec/s3fs#914): with a keep-alive endpoint, a bucket request of the main process after DataLoader workers were
forked can stall on its pooled connection until read_timeout (15 s), then retry; read what the main process
needs (ShardStream reads the manifests in its constructor) before iterating the loader.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import os
import random
import tarfile
import time
from collections import Counter

from pipeline.credentials import FSSPEC_SCHEMES, credentials_message, is_credentials_error

__all__ = ["FSSPEC_SCHEMES", "register_fsspec_schemes", "RETRIES", "ResumableObject", "BadObjectError",
           "is_transient", "is_credentials_error", "credentials_message"]

log = logging.getLogger(__name__)
RETRIES = Counter()  # transient bucket errors retried in this process, by protocol (also logged, rate-limited)
DEFAULT_RETRIES, DEFAULT_BACKOFF, DEFAULT_BLOCK_SIZE = 7, 0.5, 8 << 20  # 7 jittered retries from 0.5 s: ~30 s of outage
MAX_BACKOFF = 30.0  # seconds: the longest wait between two attempts
ENV_RETRIES, ENV_BACKOFF, ENV_BLOCK_SIZE = "MASKDM_BUCKET_RETRIES", "MASKDM_BUCKET_BACKOFF", "MASKDM_BUCKET_BLOCK_SIZE"


class BadObjectError(OSError):
    """A bucket object whose bytes cannot be used: replaced while being read (resuming at the byte offset would mix
    versions), or a tar archive cut short. Never retried; the stream counts the shard as unreadable."""


class _TarEnd:
    """Follows the header blocks of a tar byte stream to tell a complete archive (an all-zero block where a header
    is due) from one cut short: Python's tarfile ends silently when the data stops at a header boundary.
    `truncated()` at the end of the data; a header it cannot parse ends the check (tarfile judges that one)."""

    def __init__(self):
        self.pos, self.next_header, self.block, self.done, self.ended = 0, 0, b"", False, False

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view) and not self.done:
            if self.pos < self.next_header:  # member data: skip
                k = min(len(view), self.next_header - self.pos)
                self.pos, view = self.pos + k, view[k:]
                continue
            k = min(512 - len(self.block), len(view))
            self.block, self.pos, view = self.block + bytes(view[:k]), self.pos + k, view[k:]
            if len(self.block) < 512:
                continue
            if self.block.count(0) == 512:
                self.done = self.ended = True
            else:
                try:  # the size field; member data is padded to whole 512-byte blocks
                    self.next_header = self.pos + -(-tarfile.nti(self.block[124:136]) // 512) * 512
                except tarfile.HeaderError:
                    self.done = True
            self.block = b""

    def truncated(self) -> bool:
        return not self.done


class _RateLimitedLog:
    def __init__(self, every: float):
        self.every, self._last = every, -float("inf")

    def warning(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            log.warning(msg, *args)


_retry_log = _RateLimitedLog(30.0)  # one retry warning per 30 s per process, with the totals


def _env_number(name: str, kind, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected a non-negative {kind.__name__}")
    return value


@functools.lru_cache(maxsize=None)
def _transport_errors() -> tuple:
    """The client libraries' connection, timeout and truncated-body errors (those s3fs itself retries), where
    installed. botocore's are not OSErrors: EndpointConnectionError is what an unreachable endpoint raises."""
    import http.client
    import importlib

    types = [ConnectionError, TimeoutError, http.client.IncompleteRead]
    for module, names in (("botocore.exceptions", ("ConnectionError", "HTTPClientError", "IncompleteReadError")),
                          ("botocore.parsers", ("ResponseParserError",)),
                          ("aiohttp", ("ClientConnectionError", "ClientPayloadError")),
                          ("fsspec.exceptions", ("FSTimeoutError",))):
        try:
            m = importlib.import_module(module)
        except ImportError:
            continue
        types += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), type)]
    return tuple(types)


def _http_status(e: BaseException) -> int | None:
    """The HTTP status behind an error (s3fs keeps botocore's ClientError as __cause__), if any."""
    for x in (e, e.__cause__):
        response = getattr(x, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        for attr in ("status", "code"):
            if isinstance(getattr(x, attr, None), int) and 100 <= getattr(x, attr) < 600:
                return getattr(x, attr)
    return None


def is_transient(e: BaseException) -> bool:
    """Worth retrying: the endpoint unreachable or dropping connections, timeouts, throttling (s3fs: 503 SlowDown
    -> OSError EBUSY), server errors (5xx). Not: a missing object or bucket (FileNotFoundError), refused
    credentials, an object replaced while read (s3fs FileExpired, also EBUSY), bad requests."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, BadObjectError)):
        return False
    if is_credentials_error(e) or type(e).__name__ == "FileExpired":
        return False
    if isinstance(e, _transport_errors()):
        return True
    status = _http_status(e)
    if status is not None:
        return status == 429 or status >= 500
    return isinstance(e, OSError) and e.errno in (errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.EAGAIN,
                                                  errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED)


_JITTER = random.SystemRandom()  # OS entropy: forked DataLoader workers would share a seeded generator's draws


def _with_retries(call, url: str, what: str, retries: int, backoff: float, on_error=None, *,
                  sleep=time.sleep, rng=_JITTER):
    """call() with up to `retries` retries of transient errors, waiting a uniform draw from
    [0, min(backoff * 2**attempt, MAX_BACKOFF)] between (full jitter: retries of many clients spread out)."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as e:
            if on_error is not None:
                on_error()
            if attempt == retries or not is_transient(e):
                raise
            RETRIES[url.split("://", 1)[0]] += 1
            _retry_log.warning("retrying %s %s after %s: %s (retry %d of %d); retries in this process: %s",
                               what, url, type(e).__name__, e, attempt + 1, retries, dict(RETRIES))
            sleep(rng.uniform(0, min(backoff * 2 ** attempt, MAX_BACKOFF)))


@functools.lru_cache(maxsize=None)
def _filesystem(protocol: str, pid: int, conf: str):
    """One fsspec filesystem per (protocol, process, fsspec config): DataLoader workers never share a client or its
    sockets, and a changed `fsspec.config.conf` (another endpoint) gets a new client."""
    import fsspec

    return fsspec.filesystem(protocol, skip_instance_cache=True)


def _fs_for(protocol: str):
    import fsspec

    return _filesystem(protocol, os.getpid(), json.dumps(fsspec.config.conf.get(protocol, {}), sort_keys=True,
                                                         default=str))


class ResumableObject:
    """A sequential read-only file over one bucket object that survives transient errors: the object is reopened
    and read on from the current byte offset (bounded retries with backoff per read), as long as it is still the
    same object (size and ETag); otherwise BadObjectError. What webdataset's tar reader gets from `gopen`."""

    def __init__(self, url: str, *, retries: int, backoff: float, block_size: int):
        self.url, self.retries, self.backoff, self.block_size = url, retries, backoff, block_size
        self.protocol, self.path = url.split("://", 1)
        self.offset, self._f, self._identity = 0, None, None
        self._tar = _TarEnd() if url.endswith(".tar") else None
        self._retry(self._open, "opening")

    def _open(self):
        f = _fs_for(self.protocol).open(self.path, "rb", block_size=self.block_size)
        details = getattr(f, "details", None) or {}
        identity = (getattr(f, "size", None), details.get("ETag") or details.get("etag"))
        if self._identity is None:
            self._identity = identity
        elif identity != self._identity:
            f.close()
            raise BadObjectError(errno.ESTALE, f"{self.url} changed while being read (size, ETag "
                                                   f"{self._identity} -> {identity}); the shard is dropped")
        if self.offset:
            f.seek(self.offset)
        self._f = f

    def _drop(self):
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is discarded anyway
                pass
            self._f = None

    def _retry(self, call, what):
        try:
            return _with_retries(call, self.url, what, self.retries, self.backoff, on_error=self._drop)
        except Exception as e:
            if is_credentials_error(e):
                raise PermissionError(credentials_message(self.url, e)) from None
            raise

    def read(self, n: int = -1) -> bytes:
        def once():
            if self._f is None:
                self._open()
            return self._f.read(n)

        data = self._retry(once, f"reading at byte {self.offset} of")
        self.offset += len(data)
        if self._tar is not None:
            self._tar.feed(data)
            if not data and n != 0 and self._tar.truncated():
                raise BadObjectError(errno.EIO, f"{self.url}: truncated tar archive (it ends at byte {self.offset}, "
                                                f"before its end-of-archive block)")
        return data

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.offset

    def close(self) -> None:
        self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ResumableObject({self.url!r}, offset={self.offset})"


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, *, retries: int = DEFAULT_RETRIES,
                  backoff: float = DEFAULT_BACKOFF, block_size: int = DEFAULT_BLOCK_SIZE, **kw):
    """webdataset `gopen` handler: a `ResumableObject` for a bucket URL. Missing objects (FileNotFoundError) and
    refused credentials (PermissionError naming the variables to set) fail at once."""
    if mode != "rb":
        raise ValueError(f"{url}: the fsspec handler only reads (mode 'rb'), got {mode!r}")
    return ResumableObject(url, retries=retries, backoff=backoff, block_size=block_size)


def _retry_settings(retries: int | None = None, backoff: float | None = None) -> tuple[int, float]:
    """(retries, backoff): the arguments where given, else $MASKDM_BUCKET_RETRIES / $MASKDM_BUCKET_BACKOFF, else the
    defaults."""
    return (_env_number(ENV_RETRIES, int, DEFAULT_RETRIES) if retries is None else retries,
            _env_number(ENV_BACKOFF, float, DEFAULT_BACKOFF) if backoff is None else backoff)


def register_fsspec_schemes(retries: int | None = None, backoff: float | None = None,
                            block_size: int | None = None) -> None:
    """Route webdataset's bucket URLs through fsspec. Call once per process before building the dataset (no
    import-time side effects); DataLoader workers started with "spawn" must call it again (`worker_init_fn`).
    Arguments left None come from $MASKDM_BUCKET_RETRIES, $MASKDM_BUCKET_BACKOFF, $MASKDM_BUCKET_BLOCK_SIZE (read
    now, so worker processes, which call this without arguments, are configured by the environment)."""
    from webdataset.gopen import gopen_schemes

    retries, backoff = _retry_settings(retries, backoff)
    block_size = _env_number(ENV_BLOCK_SIZE, int, DEFAULT_BLOCK_SIZE) if block_size is None else block_size
    for scheme in FSSPEC_SCHEMES:
        gopen_schemes[scheme] = functools.partial(_gopen_fsspec, retries=retries, backoff=backoff,
                                                  block_size=block_size)
