r"""The transfer study (the paper's Table 3 in miniature): does 90%-masked pre-training on a large face corpus make
fine-tuning on a small local set better and faster than training from scratch, and is it the masking or the faces?

    python -m experiments.transfer --scale cpu --out runs/transfer          # ~3 h on 2 CPU cores, in stages
    python -m experiments.transfer --scale smoke --out /tmp/transfer-smoke  # every stage in a few minutes (a test)
    python -m experiments.transfer --scale cpu --out runs/transfer --only reference,scratch-10   # some stages
    python -m experiments.transfer --scale cpu --report                     # tables and figures from results.json

Data (`../shared/data`, or `--data DIR`): LFW (13,233 web faces, 5,749 identities, loosely aligned) plays VGGFace2
and goes through `pipeline.shard vggface2` with a generated loose-box file (deep-funneled LFW faces sit mid-frame,
the box is the same for every image); the first 10,000 aligned CelebA faces play CelebA-HQ through `pipeline.shard
folder` (centre squares), all of them as the FID reference and the pre-training set of arm 4, with deterministic
10% (1,000) and 1% (100) subsets made by the pipeline's `--fraction/--seed 0`.

Arms (the same model, optimiser and batch; `study.yaml` and the scale below):
  scratch        denoising (mask rate 0) on the subset, from random weights, F steps (and 4F on 10%, the paper's
                 from-scratch budget)
  maskdm-lfw     90% block-masked pre-training on LFW for P steps, then fine-tuning F steps on the subset
  dsm-lfw        the control: unmasked denoising pre-training on LFW for the same training time as maskdm-lfw's
                 P steps (`trainer/pretrain.py --time-limit`), then fine-tuning F steps: "masking" vs "more faces"
  maskdm-celeba  90% block-masked pre-training on all 10k CelebA faces for P steps, then fine-tuning F steps
Every run is the project's own command under the real DeepSpeed launcher (`trainer/pretrain.py`,
`trainer/finetune.py --init RUN`), every figure `python -m trainer.evaluate` (DDIM eta 1, a fixed seed, FID and
KID with the standard Inception network against the 10k CelebA set at the study's resolution).

Stages run in order, each records its figures in OUT/results.json as they come (and copies results.json and
the figures to the committed record folder, `--record`, default docs/transfer-study/<scale>/); running the same
command again skips what is recorded and continues, also on a fresh machine that has only the committed record:
a stage whose runs are gone re-trains only what it still needs. A killed training run resumes from its last
checkpoint, a killed evaluation from its last sample.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from trainer.core.settings import SamplingConfig
from trainer.train.rundir import RunDir, step_tag

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "study.yaml"
SHARED_DATA = REPO.parent / "shared" / "data"
LFW_TAR, CELEBA_TAR = "lfw-deepfunneled.tar", "celeba-10k-aligned-89x109.tar"
# deep-funneled LFW: 250x250 frames with the face mid-frame; VGGFace2-style loose box (x, y, w, h), scaled by the
# pipeline's --box-scale 1.3 to a 161 px square: about the framing of the aligned CelebA centre squares
LFW_BOX = (75, 62, 100, 124)
ARMS = ("scratch", "maskdm-lfw", "dsm-lfw", "maskdm-celeba")
SUBSETS = {"10": 0.10, "1": 0.01}


@dataclasses.dataclass(frozen=True)
class Scale:
    """One size of the study; every figure it records carries these settings."""

    size: int                 # crop side (px) of every shard set, the model's image size
    pretrain_steps: int       # P
    finetune_steps: int       # F
    n: int                    # generated images per evaluation (N), and real images per floor draw
    sample_steps: int         # DDIM steps (eta 1)
    ranks: int                # DeepSpeed processes (CPU ranks or GPUs)
    sets: tuple = ()          # --set overrides of study.yaml for every run of this scale
    limit: int | None = None  # smoke: the first LIMIT images of each archive only
    seeds: tuple = (0, 1)     # sampler seeds of the headline figures (at F); curves use the first
    arms: tuple = ARMS        # smoke: the three kinds of run (scratch, masked pre-training, time-limited control)
    eval_batch: int = 200

    def curve_steps(self, arm: str, subset: str) -> list[int]:
        F = self.finetune_steps
        if subset == "1":
            return [F]
        return [F // 4, F // 2, F] + ([2 * F, 4 * F] if arm == "scratch" else [])

    def train_steps(self, arm: str, subset: str) -> int:
        return self.curve_steps(arm, subset)[-1]

    def headline_steps(self, arm: str, subset: str) -> list[int]:
        F = self.finetune_steps
        return [F, 4 * F] if arm == "scratch" and subset == "10" else [F]


SCALES = {
    # measured on 2 CPU cores (docs/transfer-study.md, "Calibration")
    "cpu": Scale(size=32, pretrain_steps=3000, finetune_steps=500, n=300, sample_steps=50, ranks=2),
    # the paper's small model and mask settings at 64 px on one GPU: preset S (patch 4: 16x16 tokens), 90% masks of
    # 2x2-patch blocks (8x8 px: a block is 1/8 of the side, as the paper's 4x4 blocks of 8 px patches at 256 px;
    # 64 blocks, 6 visible), lr 2e-4, batch 128. Sized by estimate for ~10 min on an H100/H200; not yet run.
    "gpu": Scale(size=64, pretrain_steps=4000, finetune_steps=1000, n=2000, sample_steps=100, ranks=1,
                 sets=("model.preset=S", "model.image_size=64", "model.patch_size=4", "model.overrides={}",
                       "mask.block=2", "optim.lr=2e-4", "optim.betas=[0.99,0.99]", "optim.warmup_steps=0",
                       "train.global_batch=128", "train.micro_batch=128", "train.ema_decay=0.999"),
                 eval_batch=500),
    # the study on a few dozen images and a few steps, the suite's test of the command: every stage kind and figure
    # (maskdm-celeba is maskdm-lfw's code path on another shard set: left out to keep the test at a few minutes)
    "smoke": Scale(size=32, pretrain_steps=8, finetune_steps=8, n=8, sample_steps=2, ranks=1,
                   sets=("model.overrides={dim: 32, heads: 2, depth: [1, 1, 1]}", "train.global_batch=8",
                         "train.micro_batch=8", "train.log_every=2", "train.sample_steps=2", "train.sample_n=4"),
                   limit=200, eval_batch=8, arms=ARMS[:3]),
}


# --- the record -------------------------------------------------------------------------------------------------

class Results:
    """OUT/results.json: settings, the stages done, every run's length and time, every evaluation. Saved after
    each change (atomically) and copied, with the figures, to the record folder."""

    def __init__(self, out: Path, record: Path | None, scale_name: str, scale: Scale):
        self.path, self.record = out / "results.json", record
        settings = {"scale": scale_name, **dataclasses.asdict(scale), "config": CONFIG.read_text()}
        settings = json.loads(json.dumps(settings))  # as read back: tuples are lists
        source = self.path if self.path.exists() else (record / "results.json" if record else None)
        if source is not None and source.exists():
            self.data = json.loads(source.read_text())
            if self.data["settings"] != settings:
                changed = sorted(k for k in settings if self.data["settings"].get(k) != settings[k])
                raise SystemExit(f"error: {source} was recorded with other settings ({', '.join(changed)} differ): "
                                 f"its figures would not compare; give another --out (and --record), or remove it "
                                 f"to start the study over")
            if source != self.path:
                print(f"continuing the study recorded in {source}", flush=True)
        else:
            self.data = {"settings": settings, "hardware": hardware(), "stages": {}, "runs": {}, "evals": []}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)
        if self.record is not None:
            self.record.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.path, self.record / "results.json")

    def eval_of(self, key: str) -> dict | None:
        return next((e for e in self.data["evals"] if e["key"] == key), None)


def hardware() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


# --- data: the project's pipeline -------------------------------------------------------------------------------

def _safe_relative(rel: str) -> bool:
    """Whether `rel` names a file strictly inside a folder: relative, no empty, "." or ".." parts."""
    return bool(rel) and "\\" not in rel and not any(p in ("", ".", "..") for p in rel.split("/"))


def _below_top(name: str) -> str:
    """LFW's "lfw/<identity>/<image>.jpg" -> "<identity>/<image>.jpg"."""
    return name.partition("/")[2]


def _base_name(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _extract(tar_path: Path, dest: Path, limit: int | None, place) -> None:
    """Unpack the JPEGs of `tar_path` (the first `limit`) into dest via place(member name) -> relative path.
    Regular files only; a member whose relative path could leave `dest` (absolute, "..", empty parts) is skipped
    and counted."""
    if dest.is_dir():
        return
    if not tar_path.is_file():
        raise SystemExit(f"error: {tar_path} not found: the study reads the real faces of ../shared/data "
                         f"(see its README); point --data at the folder that holds {tar_path.name}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    n = unsafe = 0
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if m.isfile() and m.name.lower().endswith(".jpg"):
                rel = place(m.name)
                if not _safe_relative(rel):
                    unsafe += 1
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(tar.extractfile(m).read())
                n += 1
                if limit and n >= limit:
                    break
    if unsafe:
        print(f"  {tar_path}: skipped {unsafe} member(s) whose names would leave {dest} (absolute, '..' or empty "
              f"parts)", flush=True)
    tmp.rename(dest)  # only a complete extraction is reused


def _shard(*args) -> None:
    cmd = [sys.executable, "-m", "pipeline.shard", *map(str, args)]
    print(f"  $ python {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"error: sharding failed: {' '.join(cmd[1:])}")


def make_data(out: Path, data: Path, scale: Scale) -> dict[str, Path]:
    """Shard sets (kept when complete): lfw, celeba-all, celeba-10, celeba-1, and celeba-10-seed1 (the second
    real-vs-real floor draw)."""
    raw, shards = out / "data" / "raw", out / "data"
    lfw_vgg = raw / "lfw-vggface2"
    if not (lfw_vgg / "bb_landmark" / "loose_bb_train.csv").exists():
        _extract(data / LFW_TAR, raw / "lfw", scale.limit, _below_top)
        # VGGFace2's layout: train/<identity>/<image>.jpg plus bb_landmark/loose_bb_train.csv
        rows = ["NAME_ID,X,Y,W,H"]
        for p in sorted((raw / "lfw").rglob("*.jpg")):
            rel = p.relative_to(raw / "lfw")
            rows.append(f'"{rel.with_suffix("").as_posix()}",{",".join(map(str, LFW_BOX))}')
        shutil.rmtree(lfw_vgg, ignore_errors=True)
        (lfw_vgg / "bb_landmark").mkdir(parents=True)
        (raw / "lfw").rename(lfw_vgg / "train")
        (lfw_vgg / "bb_landmark" / "loose_bb_train.csv").write_text("\n".join(rows) + "\n")
    _extract(data / CELEBA_TAR, raw / "celeba", scale.limit, _base_name)
    sets = {"lfw": shards / "lfw", "celeba-all": shards / "celeba-all", "celeba-10": shards / "celeba-10",
            "celeba-1": shards / "celeba-1", "celeba-10-seed1": shards / "celeba-10-seed1"}
    common = ["--size", scale.size, "--no-dwt", "--shard-size", 1000, "--workers", min(2, os.cpu_count() or 1)]
    if not (sets["lfw"] / "manifest.json").exists():
        _shard("vggface2", "--src", lfw_vgg, "--out", sets["lfw"], *common)
    for name, extra in (("celeba-all", []), ("celeba-10", ["--fraction", 0.1, "--seed", 0]),
                        ("celeba-1", ["--fraction", 0.01, "--seed", 0]),
                        ("celeba-10-seed1", ["--fraction", 0.1, "--seed", 1])):
        if not (sets[name] / "manifest.json").exists():
            _shard("folder", "--src", raw / "celeba", "--out", sets[name], *common, *extra)
    return sets


def samples_in(shards: Path) -> int:
    return json.loads((shards / "manifest.json").read_text())["totals"]["samples"]


# --- runs and evaluations: the project's commands -----------------------------------------------------------------

def _records(run: Path) -> list[dict]:
    return RunDir(run).read_metrics()


class Study:
    def __init__(self, out: Path, data: Path, scale_name: str, record: Path | None):
        self.out, self.scale_name, self.scale = out, scale_name, SCALES[scale_name]
        self.res = Results(out, record, scale_name, self.scale)
        self.data_dir = data
        self._sets: dict[str, Path] | None = None

    @property
    def sets(self) -> dict[str, Path]:
        if self._sets is None:
            self._sets = make_data(self.out, self.data_dir, self.scale)
            self.res.data.setdefault("data", {n: samples_in(p) for n, p in self._sets.items()})
            self.res.save()
        return self._sets

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def _latest_step(self, run: Path) -> int:
        from trainer.train.checkpoints import COMPLETE, latest_tag

        ckpts = RunDir(run).checkpoints
        tag = latest_tag(ckpts) if ckpts.is_dir() else None
        if tag is None:
            return 0
        return json.loads((ckpts / tag / COMPLETE).read_text())["step"]

    def train(self, name: str, script: str, sets: list[str], steps: int, ckpt_every: int,
              extra: list[str] = (), time_limit: float | None = None) -> dict:
        """Train run `name` to `steps` (or for `time_limit` s of training, once; a recorded time-limited run is
        re-made to its recorded step count); returns its record {steps, images, train_s}."""
        from trainer.train.launch import launch

        run, recorded = self.run_dir(name), self.res.data["runs"].get(name)
        if recorded is not None:
            steps, time_limit = recorded["steps"], None  # the length it had: a re-made run is the same run
        if recorded is not None and self._latest_step(run) >= steps:
            return recorded
        extra = list(extra) + (["--time-limit", f"{time_limit:.2f}"] if time_limit else [])
        launch(script, run, self.scale.ranks, config=CONFIG, what=name, extra=extra,
               sets=[*self.scale.sets, *sets, f"train.steps={steps}", f"train.ckpt_every={ckpt_every}"])
        last = [r for r in _records(run) if "train_s" in r and "images" in r][-1]
        record = {"steps": last["step"], "images": last["images"], "train_s": last["train_s"],
                  "time_limit": time_limit}
        if recorded is None:
            self.res.data["runs"][name] = record
            self.res.save()
        return self.res.data["runs"][name]

    def pretrain(self, arm: str) -> dict:
        s, sets = self.scale, self.sets
        P = s.pretrain_steps
        if arm == "maskdm-lfw":
            return self.train("pretrain-maskdm-lfw", "pretrain.py", [f"data.sources=[{sets['lfw']}]"], P, P)
        if arm == "maskdm-celeba":
            return self.train("pretrain-maskdm-celeba", "pretrain.py", [f"data.sources=[{sets['celeba-all']}]"],
                              P, P)
        if arm == "dsm-lfw":  # the same training time as maskdm-lfw's P steps, unmasked
            budget = self.pretrain("maskdm-lfw")["train_s"]
            return self.train("pretrain-dsm-lfw", "pretrain.py",
                              [f"data.sources=[{sets['lfw']}]", "mask.rate=0.0"], 100 * P, 100 * P,
                              time_limit=budget)
        raise ValueError(arm)

    def finetune(self, arm: str, subset: str) -> tuple[str, dict | None]:
        s, sets = self.scale, self.sets
        steps = s.train_steps(arm, subset)
        every = s.finetune_steps // 4 if subset == "10" else s.finetune_steps
        # a record at every checkpoint step (its training time is the figure's wall time)
        common = [f"data.sources=[{sets['celeba-' + subset]}]", "mask.rate=0.0",
                  f"train.log_every={math.gcd(every, 50)}"]
        name = f"{arm}-{subset}"
        if arm == "scratch":
            self.train(name, "pretrain.py", common, steps, every)
            return name, None
        pre = self.pretrain(arm)
        self.train(name, "finetune.py", common, steps, every,
                   extra=["--init", str(self.run_dir(f"pretrain-{arm}")), "--init-weights", "online"])
        return name, pre

    def evaluate(self, arm: str, subset: str, step: int, seed: int) -> dict:
        key = f"{arm}-{subset}-step{step}-seed{seed}"
        if (done := self.res.eval_of(key)) is not None:
            return done
        s = self.scale
        name, pre = self.finetune(arm, subset)
        run = self.run_dir(name)
        out = self.out / "evals" / key
        t0 = time.time()
        metrics = self._evaluate(ckpt=RunDir(run).checkpoint(step_tag(step)), out=out,
                                 sampling=SamplingConfig(steps=s.sample_steps, eta=1.0, n=s.n, seed=seed))
        trained = [r for r in _records(run) if "train_s" in r and "images" in r and r["step"] == step]
        ft = self.res.data["runs"][name]
        ft_s = trained[-1]["train_s"] if trained else ft["train_s"] * step / ft["steps"]
        record = {"key": key, "arm": arm, "subset": f"{subset}%", "step": step, "seed": seed, "n": metrics["n"],
                  "fid": metrics["fid"], "kid": metrics["kid"], "kid_std": metrics.get("kid_std"),
                  "finetune_images": step * (ft["images"] // ft["steps"]),
                  "pretrain_images": pre["images"] if pre else 0,
                  "finetune_train_s": round(ft_s, 1), "pretrain_train_s": pre["train_s"] if pre else 0.0,
                  "eval_s": round(time.time() - t0, 1), "samples": str(out.relative_to(self.out) / "images")}
        self.res.data["evals"].append(record)
        self.res.save()
        return record

    def _evaluate(self, *, ckpt: Path | None = None, out: Path | None = None, sampling: SamplingConfig | None = None,
                  fake: Path | None = None) -> dict:
        """FID and KID against the whole CelebA 10k at the study's N, of `sampling`'s images of `ckpt` (drawn into
        `out`) or of the real images `fake`: what `python -m trainer.evaluate` computes, run in this process (one
        Python and one Inception network for every evaluation of the study). Its result."""
        from trainer.eval.protocol import compute_metrics, evaluate_model, image_source

        s, ref = self.scale, self.sets["celeba-all"]
        common = ["--ref", ref, "--n", s.n, "--metrics", "fid,kid", "--batch", s.eval_batch]
        if fake is not None:
            from trainer.train.distributed import distributed_context

            print(f"  $ python -m trainer.evaluate --fake {fake} {' '.join(map(str, common))}", flush=True)
            t0 = time.time()
            result = compute_metrics(image_source(str(fake)), image_source(str(ref)), ("fid", "kid"), n=s.n,
                                     batch=s.eval_batch, device=distributed_context()[2])
            result["seconds"] = round(time.time() - t0, 1)
        else:
            print(f"  $ python -m trainer.evaluate --ckpt {ckpt} {' '.join(map(str, sampling.to_args()[2:] + common))}"
                  f" --out {out} --no-record", flush=True)
            result = evaluate_model(str(ckpt), image_source(str(ref)), sampling, ("fid", "kid"), out=out,
                                    batch=s.eval_batch, record=False)
        print(json.dumps(result), flush=True)
        return result

    def floor(self, seed: int) -> dict:
        """Real vs real at the study's N: N aligned CelebA faces of a 10% draw (seed 0: the fine-tuning subset;
        seed 1: another draw) against the whole 10k reference (they are part of it, as the fine-tuning subset is
        part of the paper's reference)."""
        key = f"floor-seed{seed}"
        if (done := self.res.eval_of(key)) is not None:
            return done
        fake = self.sets["celeba-10" if seed == 0 else "celeba-10-seed1"]
        t0 = time.time()
        m = self._evaluate(fake=fake)
        record = {"key": key, "arm": "floor", "subset": "real", "step": 0, "seed": seed, "n": m["n"],
                  "fid": m["fid"], "kid": m["kid"], "kid_std": m.get("kid_std"), "eval_s": round(time.time() - t0, 1)}
        self.res.data["evals"].append(record)
        self.res.save()
        return record


# --- stages -------------------------------------------------------------------------------------------------------

def stages(study: Study) -> dict:
    """name -> function; in the order they run. Each finishes within ~40 minutes at --scale cpu."""
    s = study.scale
    out = {"reference": lambda: [study.floor(seed) for seed in s.seeds]}

    def arm_stage(arm: str, subset: str):
        def run():
            for step in s.curve_steps(arm, subset):
                study.evaluate(arm, subset, step, s.seeds[0])
            for step in s.headline_steps(arm, subset):
                for seed in s.seeds[1:]:
                    study.evaluate(arm, subset, step, seed)
        return run

    for arm in s.arms:  # arm by arm: a finished arm never needs its pre-training run again (a fresh machine re-trains
        if arm != "scratch":  # only the pre-training of an arm it has not finished)
            out[f"pretrain-{arm}"] = (lambda a=arm: study.pretrain(a))
        for subset in ("10", "1"):
            out[f"{arm}-{subset}"] = arm_stage(arm, subset)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--out", help="working folder: shards, runs, evaluations, results.json (default runs/transfer "
                                 "for cpu, runs/transfer-<scale> otherwise)")
    p.add_argument("--record", help="folder the results and figures are copied to, for committing (default "
                                    "docs/transfer-study/<scale> for cpu and gpu, none for smoke; 'none': none)")
    p.add_argument("--data", default=str(SHARED_DATA), help=f"folder holding {LFW_TAR} and {CELEBA_TAR}")
    p.add_argument("--only", help="comma-separated stage names to run (default: all that are not recorded)")
    p.add_argument("--report", action="store_true", help="only write the tables and figures from results.json")
    a = p.parse_args(argv)
    out = Path(a.out or ("runs/transfer" if a.scale == "cpu" else f"runs/transfer-{a.scale}")).resolve()
    default_record = None if a.scale == "smoke" else REPO / "docs" / "transfer-study" / a.scale
    record = default_record if a.record is None else (None if a.record == "none" else Path(a.record).resolve())
    study = Study(out, Path(a.data), a.scale, record)
    from experiments.transfer.report import write_report

    if a.report:
        print(write_report(study.res.data, out, record))
        return
    todo = stages(study)
    if a.only:
        unknown = [n for n in a.only.split(",") if n not in todo]
        if unknown:
            raise SystemExit(f"error: --only {','.join(unknown)}: no such stage; the stages are {', '.join(todo)}")
    names = [n for n in todo if not a.only or n in a.only.split(",")]
    start = time.time()
    for i, name in enumerate(names, 1):
        if study.res.data["stages"].get(name, {}).get("done"):
            print(f"[{i}/{len(names)}] {name}: recorded, skipped", flush=True)
            continue
        print(f"\n[{i}/{len(names)}] {name} ({a.scale} scale, {out})", flush=True)
        t0 = time.time()
        todo[name]()
        hw = hardware()  # a continued study may finish on another machine: each stage says where it ran
        study.res.data["stages"][name] = {"done": True, "seconds": round(time.time() - t0, 1),
                                          "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                          "machine": f"{hw['cpu']} x{hw['cores']}" + (f", {hw['gpu']}" if hw["gpu"]
                                                                                     else "")}
        study.res.save()
        write_report(study.res.data, out, record)
        print(f"[{i}/{len(names)}] {name} done in {time.time() - t0:.0f} s", flush=True)
    print(write_report(study.res.data, out, record))
    print(f"\nstudy done in {time.time() - start:.0f} s: {out / 'results.json'}, {out / 'curves.png'}"
          + (f"; record in {record}" if record else ""))
