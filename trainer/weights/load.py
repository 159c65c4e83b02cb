"""Model weights: where they come from, how they are checked, and the ready-to-sample model built from them.

Sources (never unpickling code: safetensors, or weights-only `torch.load`, trainer/train/safeload.py):
- a DeepSpeed run directory, its `checkpoints/` folder or one tag folder: the EMA weights from the client state
  of rank 0's model-states file (the weights the paper samples from and publishes), with the run's config; or its
  online weights (`weights="online"`: what the reference fine-tunes from), consolidated by DeepSpeed's zero_to_fp32;
- a `.safetensors` file, local or any fsspec URL (`s3://...`): an exported model (`python -m trainer.export`),
  checked against `NAME.safetensors.sha256` beside it; a URL without one is refused unless `allow_unverified`;
- a published model: a folder or URL prefix holding `index.json` (`trainer.export --publish`): the weights it
  names (a plain file name under the prefix) are fetched and must match its sha256, otherwise they are refused.
A checksum stored beside the weights only proves that they arrived whole: whoever can write the bucket can replace
both. `SOURCE#sha256=HEX` pins the digest the user got elsewhere (the model card, a release note): weights with
another digest are refused.

    state = load_pretrained("s3://bucket/models/vggface2-S")        # {name: fp32 tensor} (finetune --init)
    model, cfg, meta = load_model("runs/vggface2-S", device="cuda")  # U-ViT in eval mode (EMA), config, metadata

The metadata of an exported file (safetensors metadata is str -> str; every value except "format" is JSON) is
described in trainer/export.py; `read_weights` decodes it into the same dict a DeepSpeed checkpoint gives.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from pathlib import Path, PureWindowsPath

import torch

from pipeline.credentials import credentials_guard, refuse_url_credentials
from trainer.train import safeload
from trainer.train.checkpoints import latest_tag
from trainer.train.rundir import RunDir

__all__ = ["load_pretrained", "apply_pretrained", "load_model", "read_weights", "read_deepspeed", "online_weights",
           "is_training_run", "WEIGHTS",
           "decode_metadata", "header_metadata", "sha256_file", "split_pin", "unsafe_name", "FORMAT_VERSION", "INDEX",
           "MODEL_STATES", "PIN"]

FORMAT_VERSION = 1            # of the exported metadata and the published index.json
INDEX = "index.json"          # a published model's table of contents, uploaded last
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
PIN = "#sha256="              # SOURCE#sha256=HEX: the weights' digest, as the user got it from outside the bucket


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_pin(source: str) -> tuple[str, str | None]:
    """`SOURCE#sha256=HEX` -> (SOURCE, HEX in lower case); (source, None) without a pin."""
    base, sep, pin = source.rpartition(PIN)
    if not sep:
        return source, None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", pin):
        raise SystemExit(f"error: {source}: {PIN} takes the 64 hex digits of the weights' sha256 (as the model card "
                         f"and NAME.safetensors.sha256 give it), e.g. {base}{PIN}{'0' * 64}")
    return base, pin.lower()


def unsafe_name(name) -> str | None:
    """Why `name` cannot be a file directly under a published prefix (None if it can): a published model's files
    are siblings, so a name must not reach elsewhere (a path, '..', a drive) nor hide characters."""
    if not isinstance(name, str) or not name:
        return "empty or not a string"
    if "/" in name or "\\" in name or PureWindowsPath(name).drive:
        return "a path, not a file name"
    if ".." in name:
        return "contains '..'"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains control characters"
    return None


# --- DeepSpeed checkpoints ---------------------------------------------------------------------------------------

def _model_states(path: Path, tag: str | None) -> Path | None:
    """Rank 0's model-states file for a run dir / checkpoints dir / tag dir (the latest tag unless `tag`)."""
    for ckpt in (path, RunDir(path).checkpoints):
        name = tag or latest_tag(ckpt)  # the newest complete checkpoint
        if name is not None and (ckpt / name).is_dir():
            path = ckpt / name
            break
    return next((path / n for n in MODEL_STATES if (path / n).is_file()), None)


def read_deepspeed(source: str | Path, tag: str | None = None) -> tuple[dict, Path]:
    """(client state, model-states file) of a maskdm DeepSpeed checkpoint; SystemExit naming the path otherwise."""
    path = Path(source)
    if not path.is_dir():
        raise SystemExit(f"error: {source}: no such directory (give a training run directory, its checkpoints/ "
                         f"folder, one checkpoint tag folder, or a .safetensors file)")
    states = _model_states(path, tag)
    if states is None:
        what = f"no checkpoint tag {tag!r}" if tag else "no checkpoints/latest"
        raise SystemExit(f"error: {source}: neither a .safetensors file, a published model ({INDEX}) nor a "
                         f"DeepSpeed checkpoint ({what}, and no {MODEL_STATES[0]} in it): give the --run-dir of "
                         f"pretrain.py/finetune.py, its checkpoints/ folder or one tag folder")
    client = safeload.load(states)
    if "ema" not in client:
        raise SystemExit(f"error: {source}: {states} has no EMA weights (not a maskdm checkpoint)")
    return client, states


def online_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The online (optimised, not EMA) fp32 weights of one DeepSpeed checkpoint tag folder, any ZeRO stage and
    precision: DeepSpeed's own consolidation (`zero_to_fp32`) of the fp32 master weights from every rank's optimiser
    shard, with weights-only loading (trainer/train/safeload.py) as resuming the run does."""
    import contextlib
    import logging

    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), safeload.weights_only_loads():  # stdout: its progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {tag_dir}: cannot read its online weights ({e}); the optimiser state files "
                         f"must be there (a complete checkpoint), or use the EMA weights (--init-weights ema)") from None
    finally:
        ds_logger.setLevel(level)
    return {k: v.float() for k, v in state.items()}


def _deepspeed_weights(source: str, tag: str | None, which: str = "ema") -> tuple[dict[str, torch.Tensor], dict]:
    client, states = read_deepspeed(source, tag)
    meta = {"source": source, "kind": "deepspeed", "checkpoint": str(states.parent), "tag": states.parent.name,
            "dtype": "float32", "step": client.get("step"), "ema_decay": client["ema"].get("decay"), "weights": which}
    if "config" in client:
        meta["config"] = client["config"]
        if meta["step"] is not None:
            meta["images"] = meta["step"] * client["config"]["train"]["global_batch"]
    if which == "online":
        return online_weights(states.parent), meta
    return dict(client["ema"]["shadow"]), meta


# --- safetensors and published models ----------------------------------------------------------------------------

def decode_metadata(raw: dict[str, str] | None) -> dict:
    """safetensors metadata (str -> str) -> values: JSON decoded where they are JSON, plain strings otherwise."""
    out = {}
    for k, v in (raw or {}).items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: 8-byte little-endian header length, then the JSON header."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def _fs(url: str):
    import fsspec

    refuse_url_credentials(url, "weights URL")
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise SystemExit(f"error: {url}: {e}. Install the bucket support with: pip install 'maskdm[s3]'") from None


def _check_pin(source: str, digest: str, pin: str | None) -> None:
    if pin is not None and digest != pin:
        raise SystemExit(f"error: {source}: sha256 {digest} is not the pinned {PIN}{pin}: these are not the weights "
                         f"you pinned (replaced, corrupt or another version); refusing them. Check the digest "
                         f"against the one you were given")


def _safetensors_weights(source: str, pin: str | None, allow_unverified: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A .safetensors file, checked against the user's pin, else `NAME.safetensors.sha256` beside it (sha256sum
    format). Without either: refused from a URL unless `allow_unverified`; a local file is the user's own."""
    from safetensors.torch import load as load_safetensors

    if "://" not in source and not Path(source).is_file():
        raise SystemExit(f"error: {source}: no such file")
    fs, path = _fs(source)
    data = fs.cat_file(path)
    digest = hashlib.sha256(data).hexdigest()
    _check_pin(source, digest, pin)
    try:
        expected = fs.cat_file(path + ".sha256").decode().split()[0]
    except (FileNotFoundError, IndexError):
        expected = None
    if expected is None and pin is None and "://" in source and not allow_unverified:
        raise SystemExit(f"error: {source}: no {source}.sha256 beside it, so nothing checks that these are whole, "
                         f"unaltered weights; pin their digest ({source}{PIN}HEX) or pass --allow-unverified")
    if expected is not None and expected != digest:
        raise SystemExit(f"error: {source}: sha256 {digest} does not match {source}.sha256 ({expected}): the file is "
                         f"corrupt or incomplete; download or export it again")
    meta = {**decode_metadata(header_metadata(data)), "source": source, "kind": "safetensors", "sha256": digest}
    return load_safetensors(data), meta


def _published_weights(source: str, pin: str | None) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Weights of a published prefix (None if there is no index.json), verified against the index's sha256 and the
    user's pin (the index sits in the same bucket: only a pin guards against whoever can write both)."""
    from safetensors.torch import load as load_safetensors

    fs, root = _fs(source)
    root = root.rstrip("/")
    try:
        index = json.loads(fs.cat_file(f"{root}/{INDEX}"))
    except FileNotFoundError:
        return None
    if index.get("maskdm_published", 0) > FORMAT_VERSION:
        raise SystemExit(f"error: {source}: published with a newer maskdm (format {index['maskdm_published']}); "
                         f"upgrade maskdm")
    try:
        name = index["weights"]
        expected = index["files"][name]["sha256"]
    except (KeyError, TypeError):
        raise SystemExit(f"error: {source}: malformed {INDEX} (no weights entry with a sha256)") from None
    for n in (name, *index["files"]):
        if why := unsafe_name(n):
            raise SystemExit(f"error: {source}: {INDEX} names the file {n!r} ({why}); refusing it: a published "
                             f"model's files sit directly under its prefix. Publish it again with trainer.export")
    data = fs.cat_file(f"{root}/{name}")
    digest = hashlib.sha256(data).hexdigest()
    _check_pin(source, digest, pin)
    if digest != expected:
        raise SystemExit(f"error: {source}: {name} has sha256 {digest} but {INDEX} says {expected}: the object is "
                         f"corrupt, truncated or being replaced; refusing it. Publish it again with "
                         f"`python -m trainer.export RUN --out DIR/{name} --publish {source}`")
    meta = {**decode_metadata(header_metadata(data)), "source": source, "kind": "published", "sha256": digest,
            "published": index}
    return load_safetensors(data), meta


WEIGHTS = ("ema", "online")


def read_weights(source: str, tag: str | None = None, weights: str = "ema",
                 allow_unverified: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """({name: tensor as stored}, metadata) from any source listed in the module docstring. The metadata holds
    at least source (without a pin) and kind ("deepspeed", "safetensors", "published"), and for maskdm weights the
    config (`ExperimentConfig.to_dict()`), step and images. `weights`: "ema" (every source), or "online" (the
    optimised weights, which only a DeepSpeed checkpoint holds: an exported or published file holds the EMA only).
    `SOURCE#sha256=HEX` pins the weights' digest; `allow_unverified` reads a URL that has no checksum beside it."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: choose one of {WEIGHTS}")
    source, pin = split_pin(str(source))
    with credentials_guard(source):  # a bucket refusing the credentials: the bucket and what to set, no traceback
        state, meta = _read_weights(source, tag, weights, pin, allow_unverified)
    if weights == "online" and meta["kind"] != "deepspeed":
        raise SystemExit(f"error: {source}: an exported model holds only the EMA weights (trainer.export writes the "
                         f"EMA), not the online ones; give the training run directory for those, or use the EMA "
                         f"(finetune.py --init-weights ema)")
    meta.setdefault("weights", "ema")
    return state, meta


def _read_weights(source: str, tag: str | None, weights: str, pin: str | None,
                  allow_unverified: bool) -> tuple[dict[str, torch.Tensor], dict]:
    if source.endswith(".safetensors"):
        return _safetensors_weights(source, pin, allow_unverified)
    if source.rstrip("/").endswith("/" + INDEX):
        source = source.rstrip("/")[: -len(INDEX) - 1]
    if "://" in source or (Path(source) / INDEX).is_file():
        found = _published_weights(source, pin)
        if found is not None:
            return found
        if "://" in source:
            raise SystemExit(f"error: {source}: no {INDEX} there, so not a published model (or its publishing has "
                             f"not finished: {INDEX} is uploaded last). A single file needs its .safetensors URL")
    if pin is not None:
        raise SystemExit(f"error: {source}{PIN}{pin}: a pin checks an exported .safetensors file or a published "
                         f"model; a training run has no single digest: drop {PIN}")
    return _deepspeed_weights(source, tag, weights)


def is_training_run(source: str) -> bool:
    """Whether `source` is a local DeepSpeed run / checkpoints / tag folder (so it holds the online weights too)."""
    source = str(source)
    if "://" in source or source.endswith(".safetensors") or not Path(source).is_dir():
        return False
    return not (Path(source) / INDEX).is_file() and _model_states(Path(source), None) is not None


# --- what the CLIs call ------------------------------------------------------------------------------------------

def load_pretrained(source: str, weights: str = "ema", allow_unverified: bool = False) -> dict[str, torch.Tensor]:
    """{parameter name: fp32 tensor} from a DeepSpeed checkpoint (its EMA or, `weights="online"`, its online
    weights), a safetensors file/URL or a published model (EMA only); pins and `allow_unverified` as read_weights."""
    state, _ = read_weights(source, weights=weights, allow_unverified=allow_unverified)
    return {k: v.float() for k, v in state.items()}


def load_model(source: str, device: torch.device | str = "cpu", allow_unverified: bool = False):
    """(U-ViT in eval mode holding the EMA weights, ExperimentConfig, metadata) for sampling and evaluation.
    The model is built from the checkpoint's config exactly as the training loop builds it, in fp32 (weights
    exported in fp16 are widened); every parameter must be present. The metadata: step, images, source, kind,
    dtype, params, and what the export recorded (metrics, data, ...). Pins and `allow_unverified` as read_weights."""
    from trainer.train.config import ExperimentConfig

    state, meta = read_weights(source, allow_unverified=allow_unverified)
    if "config" not in meta:
        raise SystemExit(f"error: {source}: no maskdm config in its metadata (not written by python -m trainer.export);"
                         f" build the model yourself and load the weights with trainer.weights.load.load_pretrained")
    if isinstance(meta.get("maskdm_format"), int) and meta["maskdm_format"] > FORMAT_VERSION:
        raise SystemExit(f"error: {source}: exported by a newer maskdm (format {meta['maskdm_format']}); upgrade")
    try:
        cfg = ExperimentConfig.from_dict(meta.pop("config"), where=f"{source} (config)")
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
    m = cfg.model
    model = m.build()
    missing, unexpected = apply_pretrained(model, {k: v.float() for k, v in state.items()})
    if missing or unexpected:
        raise SystemExit(f"error: {source}: the weights do not match the model of its own config: missing "
                         f"{missing}, unexpected {unexpected}")
    meta["params"] = sum(p.numel() for p in model.parameters())
    return model.to(device).eval(), cfg, meta


def apply_pretrained(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy matching weights into `model`; return (missing, unexpected) key lists. A key present in both with
    another shape is an error that names it (e.g. a model built for another resolution)."""
    own = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise SystemExit("error: pre-trained weights do not fit the model (check model.preset / image_size / "
                         "patch_size against the pre-training config):\n  " + "\n  ".join(wrong))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected
