"""Public checkpoints: a training run's EMA weights as safetensors, with a model card and a checksum, and publishing
them to a bucket (or any fsspec URL) so that readers never trust a half-uploaded model. The command is
`python -m trainer.export` (trainer/export.py).

The source is a training run directory (pretrain.py/finetune.py --run-dir), its checkpoints/ folder or one tag folder;
the latest checkpoint unless --tag. The weights are the fp32 EMA kept by the loop (full and gathered under ZeRO-3)
in the client state of rank 0's model-states file, read with `torch.load(weights_only=True)`. Written beside --out:
`README.md` (the model card) and `NAME.safetensors.sha256` (sha256sum format). The same checkpoint and flags give
byte-identical files (the safetensors file is written here, tensors by name and metadata keys sorted).

Metadata of the safetensors file (str -> str; every value except "format" = "pt" is JSON):
    maskdm_format   1                     maskdm_version   the package version that exported it
    dtype           "float32"/"float16"   config           the resolved ExperimentConfig.to_dict()
    step, images    training progress     ema_decay, checkpoint (the tag exported)
    architecture    preset, params, input mode, image size, dim, heads, depth, patch size
    data            per data.sources entry: sha256 of its manifest.json and sample count, or "unavailable"
    metrics         {"train": last training record of metrics.jsonl at or before the step,
                     "eval": records of that step with fid*/kid*/swd* keys (appended by trainer.evaluate)}

Published layout under the --publish prefix, uploaded in this order:
    README.md, NAME.safetensors.sha256    1. model card and checksum
    NAME.safetensors                      2. the weights
    index.json                            3. last: each file's size and sha256, the weights' name, a summary
A reader (`trainer.weights.load.load_model` / `load_pretrained`, so `finetune --init URL`, `trainer.sample --ckpt URL`)
trusts a prefix only once index.json exists, only weights whose sha256 matches it, and only plain file names in it;
`URL#sha256=HEX` (the digest in the model card) also refuses weights replaced together with the index. Replacing
different content first deletes the old index.json, so the prefix reads as "not published" until the new upload is
complete.
Re-publishing identical content (same sha256 in the existing index, same object sizes) uploads nothing;
--force uploads anyway (e.g. to repair an object corrupted in place).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from pipeline.credentials import refuse_url_credentials
from trainer.core.settings import EXPORT_DTYPES, torch_dtype
from trainer.train.rundir import RunDir
from trainer.weights.load import (FORMAT_VERSION, INDEX, decode_metadata, header_metadata, read_deepspeed, sha256_file,
                                  unsafe_name)

__all__ = ["export", "publish", "write_safetensors", "data_manifests", "run_metrics", "model_card"]

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16"}
CARD = "README.md"
CARD_MARKER = "<!-- maskdm model card"
EVAL_PREFIXES = ("fid", "kid", "swd")   # metrics.jsonl keys of evaluation records (fid, fid50k, kid_mean, ...)


def _maskdm_version() -> str:
    try:
        return version("maskdm")
    except PackageNotFoundError:
        return "unknown (not installed)"


# --- what goes into the file ------------------------------------------------------------------------------------

def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte little-endian header size, JSON header, raw little-endian data), written
    here rather than by `safetensors.torch.save_file` because that writes the metadata in hash order: the same
    weights would give another file (and sha256) on every export, and re-publishing could never be a no-op."""
    assert sys.byteorder == "little", "safetensors stores little-endian data"
    header, offset = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer pads it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in sorted(tensors):
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def architecture(cfg, state: dict[str, torch.Tensor]) -> dict:
    """The U-ViT of the config (built on the meta device: no memory, no init cost) checked against the weights."""

    m = cfg.model
    with torch.device("meta"):
        model = m.build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}, "the EMA does not match the config's model"
    u = model.cfg
    return {"preset": m.preset, "params": sum(p.numel() for p in model.parameters()), "input": m.input,
            "image_size": m.image_size, "in_channels": u.in_channels, "model_size": u.image_size,
            "patch_size": u.patch_size, "dim": u.dim, "heads": u.heads, "depth": list(u.depth), "tokens": u.num_tokens}


def data_manifests(sources) -> list[dict]:
    """sha256 of each shard set's manifest.json (and its sample count), "unavailable" where it cannot be read."""
    import fsspec

    out = []
    for source in sources:
        entry = {"source": source, "manifest_sha256": "unavailable"}
        if "{" in source or source.endswith(".tar"):
            out.append({**entry, "reason": "a shard pattern, not a shard-set folder"})
            continue
        try:
            fs, root = fsspec.core.url_to_fs(source.rstrip("/"))
            data = fs.cat_file(f"{root}/manifest.json")
        except (OSError, ImportError, ValueError) as e:
            out.append({**entry, "reason": type(e).__name__})
            continue
        entry["manifest_sha256"] = hashlib.sha256(data).hexdigest()
        try:
            entry["samples"] = json.loads(data)["totals"]["samples"]
        except (ValueError, KeyError, TypeError):
            pass
        out.append(entry)
    return out


def run_metrics(run: RunDir, step: int) -> dict:
    """The latest training record at or before `step` and the evaluation records of `step` in metrics.jsonl."""
    train, evals = None, []
    for r in run.read_metrics():
        if any(k.lower().startswith(EVAL_PREFIXES) for k in r):
            if r.get("step", step) == step:
                evals.append(r)
        elif "loss" in r and r.get("step", 0) <= step:
            train = r
    return {"train": train, "eval": evals[-10:]}


# --- the model card -------------------------------------------------------------------------------------------

def model_card(meta: dict, weights: str, sha256: str, url: str | None = None) -> str:
    cfg, a = meta["config"], meta["architecture"]
    where = url or f"path/to/{weights}"
    mode = (f"DWT: 12 Haar bands x {a['model_size']}x{a['model_size']} for {a['image_size']} px RGB"
            if a["input"] == "dwt" else f"pixel: RGB {a['image_size']}x{a['image_size']}")
    mask = cfg["mask"]
    objective = (f"masked score matching (MaskDM, Lei et al. 2023), {mask['rate']:.0%} of the patches dropped "
                 f"({mask['kind']} masks)" if mask["rate"] > 0 else "denoising score matching on every patch")
    lines = [
        f"{CARD_MARKER}: written by `python -m trainer.export`, rewritten on every export -->",
        f"# {cfg['name']}: U-ViT-{a['preset']} face diffusion model (MaskDM)", "",
        f"A pixel-space denoising diffusion model (epsilon prediction, T = 1000, {cfg['train']['schedule']} beta "
        f"schedule) with a U-ViT backbone, trained by {objective}. The weights are the exponential moving average "
        f"(decay {meta['ema_decay']}) of the training weights, stored in {meta['dtype']}.", "",
        "## Architecture", "", "| | |", "|---|---|",
        f"| preset | {a['preset']} ({a['dim']} dim, {a['heads']} heads, {'+'.join(map(str, a['depth']))} blocks) |",
        f"| parameters | {a['params']:,} |",
        f"| input | {mode}; patch size {a['patch_size']}, {a['tokens']} tokens |", "",
        "## Training", "",
        f"- {meta['step']:,} steps, {meta['images']:,} images seen (global batch {cfg['train']['global_batch']}); "
        f"AdamW lr {cfg['optim']['lr']}, betas {tuple(cfg['optim']['betas'])}, weight decay "
        f"{cfg['optim']['weight_decay']}; checkpoint `{meta['checkpoint']}`.",
        "- Data (shard sets; sha256 of their manifest.json):", ""]
    lines += ["| source | samples | manifest sha256 |", "|---|---|---|"]
    lines += [f"| `{d['source']}` | {d.get('samples', '?')} | {d['manifest_sha256']} |" for d in meta["data"]]
    lines += ["", "## Metrics", ""]
    train = meta["metrics"]["train"]
    lines.append(f"- training loss {train['loss']:.4f} at step {train['step']}" if train
                 else "- no training record found in the run's metrics.jsonl")
    for r in meta["metrics"]["eval"]:
        lines.append("- " + ", ".join(f"{k}: {v}" for k, v in r.items()))
    if not meta["metrics"]["eval"]:
        lines.append("- no evaluation (FID/KID/SWD) recorded for this step at export time")
    lines += ["", "## How to use", "", "```bash",
              "# fine-tune from these weights (mask.rate: 0 in YOUR_FINETUNE.yaml)",
              f"deepspeed trainer/finetune.py --init {where} --config YOUR_FINETUNE.yaml \\",
              "    --deepspeed_config ds_configs/zero2_fp16.json --run-dir runs/ft",
              "# sample 64 images from them" + ("" if url else ", in the folder of this card") + " (into a folder "
              "under samples/ that the command prints, or --out DIR)", f"python -m trainer.sample --ckpt "
              f"{url or weights}", "```", "",
              "```python", "from trainer.weights.load import load_model",
              f'model, cfg, meta = load_model("{where}")  # U-ViT in eval mode, its config, this metadata', "```", "",
              "Loading verifies the sha256 (index.json of a published prefix, or the .sha256 file beside the "
              "weights) and never unpickles code. Whoever can write the bucket can replace both the weights and "
              f"their checksum: to refuse any other weights, pin this digest, `--init {where}#sha256={sha256}` (the "
              "same for `--ckpt`).", "",
              "## Files", "", f"- `{weights}` sha256 `{sha256}`",
              f"- exported by maskdm {meta['maskdm_version']} (format {meta['maskdm_format']})", "",
              "## License and intended use", "",
              "These weights are derived from the training data above. Before using or redistributing them, check "
              "the terms of each dataset they were trained on (face datasets such as VGGFace2 and CelebA-HQ are "
              "released for non-commercial research only, and their images show real people). maskdm's own "
              "license covers the code, not the data or the weights derived from it.", ""]
    return "\n".join(lines)


# --- export and publish -----------------------------------------------------------------------------------------

def export(ckpt_dir: str, out: str | Path, dtype: str = "fp32", tag: str | None = None, url: str | None = None,
           log=print) -> dict:
    """Write OUT (safetensors), README.md and OUT.sha256; return the metadata (decoded) plus "sha256"."""
    from pipeline.store import Store
    from trainer.train.config import ExperimentConfig

    out = Path(out)
    if url:  # before anything is written: the model card names it
        refuse_url_credentials(url, "--publish")
    if dtype not in EXPORT_DTYPES:
        raise SystemExit(f"error: --dtype {dtype}: an export stores one of {', '.join(EXPORT_DTYPES)}")
    if out.suffix != ".safetensors":
        raise SystemExit(f"error: --out {out}: name the weights file NAME.safetensors (loaders go by the suffix)")
    if (out.parent / CARD).exists() and not (out.parent / CARD).read_text(errors="replace").startswith(CARD_MARKER):
        raise SystemExit(f"error: --out {out}: {out.parent / CARD} exists and is not a maskdm model card; export "
                         f"into a folder of its own, e.g. --out exports/NAME/model.safetensors")
    log(f"reading {ckpt_dir}" + (f" (tag {tag})" if tag else ""))
    client, states = read_deepspeed(ckpt_dir, tag)
    if "config" not in client:
        raise SystemExit(f"error: {states}: no config in the checkpoint's client state (not a maskdm run)")
    cfg = ExperimentConfig.from_dict(client["config"], where=str(states))
    shadow, step = client["ema"]["shadow"], int(client["step"])
    tensors = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in shadow.items()}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"error: {states}: non-finite EMA weights in {dtype} ({bad[:5]}); "
                         f"{'export with --dtype fp32' if dtype == 'fp16' else 'the run diverged'}")
    meta = {"format": "pt", "maskdm_format": FORMAT_VERSION, "maskdm_version": _maskdm_version(),
            "dtype": str(torch_dtype(dtype)).removeprefix("torch."), "config": cfg.to_dict(), "step": step,
            "images": step * cfg.train.global_batch, "ema_decay": client["ema"].get("decay"),
            "checkpoint": states.parent.name, "architecture": architecture(cfg, shadow),
            "data": data_manifests(cfg.data.sources), "metrics": run_metrics(RunDir.of_checkpoint(states.parent), step)}
    log(f"checkpoint {states.parent} (step {step}, {meta['images']} images): {len(tensors)} tensors, "
        f"{meta['architecture']['params']:,} parameters, {meta['dtype']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Store(str(out.parent))
    tmp = store.tmp_file(out.name)
    write_safetensors(tmp, tensors, {k: v if k == "format" else json.dumps(v, sort_keys=True)
                                     for k, v in meta.items()})
    digest = sha256_file(tmp)
    store.publish(tmp, out.name)
    store.write_bytes(out.name + ".sha256", f"{digest}  {out.name}\n".encode())
    store.write_bytes(CARD, model_card(meta, out.name, digest, url).encode())
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {digest}), {out.name}.sha256 and {CARD}")
    return {**meta, "sha256": digest}


def _file_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(8)
        head += f.read(int.from_bytes(head, "little"))
    return decode_metadata(header_metadata(head))


def publish(weights: str | Path, url: str, force: bool = False, log=print) -> str:
    """Upload an export (weights + README.md + .sha256 beside it) to URL/ in the order of the module docstring;
    "unchanged" when URL already holds the same content, else "published"."""
    from pipeline.store import Store

    weights = Path(weights)
    if why := unsafe_name(weights.name):  # readers refuse such a name in index.json
        raise SystemExit(f"error: {weights}: {weights.name!r} cannot be published ({why}); export it under a plain "
                         f"name, e.g. --out DIR/model.safetensors")
    names = [CARD, weights.name + ".sha256", weights.name]  # upload order; index.json comes last
    missing = [n for n in names if not (weights.parent / n).is_file()]
    if missing:
        raise SystemExit(f"error: {weights}: {missing} missing beside it; run the export first")
    files = {n: {"size": (weights.parent / n).stat().st_size, "sha256": sha256_file(weights.parent / n)}
             for n in names}
    m = _file_metadata(weights)
    a = m["architecture"]
    index = {"maskdm_published": FORMAT_VERSION, "weights": weights.name, "files": files,
             "metadata": {"name": m["config"]["name"], "step": m["step"], "images": m["images"],
                          "dtype": m["dtype"], "preset": a["preset"], "params": a["params"], "input": a["input"],
                          "image_size": a["image_size"], "maskdm_version": m["maskdm_version"],
                          "metrics": m["metrics"]}}
    store = Store(url)
    store.makedirs()
    try:
        old = json.loads(store.fs.cat_file(store.path(INDEX)))
    except FileNotFoundError:
        old = None
    except ValueError:   # unreadable index: replace it
        old = {}
    if (old and not force and old.get("weights") == weights.name and old.get("files") == files
            and all(store.size(n) == f["size"] for n, f in files.items())):
        log(f"{url}: already published with the same content (sha256 {files[weights.name]['sha256']}): "
            f"nothing uploaded")
        return "unchanged"
    if old is not None:
        store.remove(INDEX)  # readers stop trusting the prefix before any of its objects changes
        log(f"{url}: removed the old {INDEX} (the prefix reads as unpublished until the upload completes)")
    for n in names:
        local = weights.parent / n
        if store.local:
            tmp = store.tmp_file(n)
            shutil.copyfile(local, tmp)
            store.publish(tmp, n)
        else:
            store.fs.put_file(str(local), store.path(n))
        if store.size(n) != files[n]["size"]:
            raise SystemExit(f"error: {url}/{n}: uploaded {store.size(n)} bytes, expected {files[n]['size']}; "
                             f"publish again")
        log(f"uploaded {url}/{n} ({files[n]['size'] / 1e6:.1f} MB)")
    store.write_json(INDEX, index)
    log(f"published {url} ({INDEX} written last)")
    return "published"
