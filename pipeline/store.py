"""Output locations: a local folder or any fsspec URL (s3://bucket/prefix with the `s3` extra).

Nothing is ever visible under its final name before it is complete: local files are written to a temporary name
in the same folder and renamed (atomic on POSIX); bucket objects are uploaded whole from a finished local file
(an object store makes an object visible only once its upload completes)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import fsspec

from pipeline.credentials import refuse_url_credentials

__all__ = ["Store"]


class Store:
    def __init__(self, url: str):
        refuse_url_credentials(url, "URL")
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except ImportError as e:
            raise SystemExit(f"error: {url}: {e}. Install the bucket support with: pip install 'maskdm[s3]'") from None
        self.local = self.fs.protocol in ("file", "local") or "file" in (self.fs.protocol or ())
        if self.local:
            self.root = str(Path(self.root).resolve())

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def makedirs(self, sub: str = "") -> None:
        if self.local:
            os.makedirs(self.path(sub) if sub else self.root, exist_ok=True)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self.path(name)))
        except FileNotFoundError:
            return None

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open(self.path(name), "rb") as f:
            return f.read()

    def read_json(self, name: str):
        return json.loads(self.read_bytes(name))

    def tmp_file_path(self, name: str, tmp_dir: str | None = None) -> str:
        """Where `tmp_file` puts its files for `name` (a folder plus the file-name prefix)."""
        if self.local:
            d = os.path.dirname(self.path(name))
        else:  # bucket output: a local folder per destination, so jobs on one node never collide
            tag = hashlib.sha256(self.url.encode()).hexdigest()[:12]
            d = os.path.join(tmp_dir or tempfile.gettempdir(), f"maskdm-upload-{tag}")
        return os.path.join(d, ".tmp-" + os.path.basename(name) + ".")

    def tmp_file(self, name: str, tmp_dir: str | None = None) -> str:
        """A new local temporary file for building `name`: beside the target when local (same filesystem, so the
        final rename is atomic), else in `tmp_dir` (default: the system temp folder)."""
        prefix = self.tmp_file_path(name, tmp_dir)
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix))
        os.close(fd)
        return tmp

    def publish(self, tmp: str, name: str) -> None:
        """Make the finished local file `tmp` visible as `name` (rename or upload), then drop `tmp`."""
        if self.local:
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path(name))
            return
        try:
            self.fs.put_file(tmp, self.path(name))
        finally:
            os.unlink(tmp)

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self.tmp_file(name)
        with open(tmp, "wb") as f:
            f.write(data)
        self.publish(tmp, name)

    def write_json(self, name: str, obj) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name))
