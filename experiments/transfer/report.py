"""The transfer study's tables and figures, from results.json alone (so they can be redrawn from the committed
record): report.md (Table 3's shape, the curves' points, the runs), curves.png (FID and KID vs fine-tune step on
the 10% subset, one line per arm, the real-vs-real floor as a band) and grid-<arm>-<subset>.png (the first 64
samples of each arm at F, seed 0; grid-scratch-10-4F.png: from scratch at 4F)."""
from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import numpy as np

LABELS = {"scratch": "from scratch", "maskdm-lfw": "MaskDM on LFW (90% masked)",
          "dsm-lfw": "DSM on LFW, same time (control)", "maskdm-celeba": "MaskDM on CelebA 10k (90% masked)"}
COLORS = {"scratch": "tab:gray", "maskdm-lfw": "tab:red", "dsm-lfw": "tab:blue", "maskdm-celeba": "tab:green"}
GRID = 64


def _evals(data: dict, **match) -> list[dict]:
    return [e for e in data["evals"] if all(e.get(k) == v for k, v in match.items())]


def _spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    values = [v * scale for v in values]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def headline(data: dict, arm: str, subset: str, step: int, metric: str = "fid") -> list[float]:
    return [e[metric] for e in _evals(data, arm=arm, subset=subset, step=step)]


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First fine-tune step at which the curve (linearly interpolated) is at or below target; None if never."""
    for (s0, f0), (s1, f1) in zip([(0, float("inf"))] + curve, curve):
        if f1 <= target:
            if not np.isfinite(f0) or f0 == f1:
                return float(s1)
            return s0 + (f0 - target) / (f0 - f1) * (s1 - s0)
    return None


def _curve(data: dict, arm: str, subset: str, seed: int, metric: str = "fid") -> list[tuple[int, float]]:
    return sorted((e["step"], e[metric]) for e in _evals(data, arm=arm, subset=subset, seed=seed))


def write_report(data: dict, out: Path, record: Path | None) -> str:
    s = data["settings"]
    F, seed0 = s["finetune_steps"], s["seeds"][0]
    floor_fid = [e["fid"] for e in _evals(data, arm="floor")]
    floor_kid = [e["kid"] for e in _evals(data, arm="floor")]
    lines = [f"# Transfer study, scale {s['scale']}: {s['size']} px, P = {s['pretrain_steps']}, F = {F}, "
             f"N = {s['n']}, DDIM eta 1 with {s['sample_steps']} steps",
             "", f"Hardware: {data['hardware']['cpu']} ({data['hardware']['cores']} cores), GPU "
             f"{data['hardware']['gpu'] or 'none'}, torch {data['hardware']['torch']}.", "",
             f"FID / KID x1e3 of {s['n']} samples against all {data.get('data', {}).get('celeba-all', '?')} CelebA "
             f"faces; mean ± half the range over sampler seeds {list(s['seeds'])} (a single figure: one seed).", "",
             "| arm | fine-tune steps | FID 10% | FID 1% | KID x1e3 10% | KID x1e3 1% |", "|---|---:|---:|---:|---:|---:|"]
    rows = [("scratch", F), ("scratch", 4 * F), ("maskdm-lfw", F), ("dsm-lfw", F), ("maskdm-celeba", F)]
    for arm, step in rows:
        cells = [_spread(headline(data, arm, sub, step)) for sub in ("10%", "1%")]
        kids = [_spread(headline(data, arm, sub, step, "kid"), 1e3) for sub in ("10%", "1%")]
        lines.append(f"| {LABELS[arm]} | {step} | {cells[0]} | {cells[1]} | {kids[0]} | {kids[1]} |")
    lines.append(f"| real vs real (floor) | - | {_spread(floor_fid)} | | {_spread(floor_kid, 1e3)} | |")

    for metric in ("fid", "kid"):
        for sub in ("10%", "1%"):
            base = headline(data, "scratch", sub, F, metric)
            relative = ", ".join(f"{arm} {100 * (statistics.fmean(v) / statistics.fmean(base) - 1):+.0f}%"
                                 for arm in ARMS_PRETRAINED if (v := headline(data, arm, sub, F, metric)) and base)
            lines += ["", f"{metric.upper()} relative to from scratch at the same F ({sub}, means over seeds): "
                          f"{relative or '-'}"]
    scratch_curve = _curve(data, "scratch", "10%", seed0)
    final = [f for st, f in scratch_curve if st == 4 * F]
    if final:
        reach = []
        for arm in ARMS_PRETRAINED:
            curve = _curve(data, arm, "10%", seed0)
            if curve:
                st = steps_to_reach(curve, final[0])
                reach.append(f"{arm} {'not within its ' + str(curve[-1][0]) if st is None else f'{st:.0f}'}")
        lines += ["", f"Fine-tune steps to reach from-scratch's FID at 4F ({final[0]:.2f}, seed {seed0}, linear "
                  f"interpolation between evaluated steps): " + (", ".join(reach) or "-")]
    if scratch_curve:
        speed = []
        for arm in ARMS_PRETRAINED:
            at_f = [f for st, f in _curve(data, arm, "10%", seed0) if st == F]
            if at_f:
                st = steps_to_reach(scratch_curve, at_f[0])
                speed.append(f"{arm} ({at_f[0]:.2f}): " + (f"{st:.0f} steps, {st / F:.1f}x F" if st is not None else
                                                            f"not within {scratch_curve[-1][0]}"))
        lines += ["", f"Steps from scratch needs to reach each arm's FID at F (10%, seed {seed0}, interpolated): "
                  + (", ".join(speed) or "-")]

    lines += ["", "## Every evaluation", "", "| arm | subset | step | seed | N | FID | KID x1e3 | images seen "
              "(pre-train + fine-tune) | training time (pre-train + fine-tune) | eval time |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in sorted(data["evals"], key=lambda e: (e["arm"] != "floor", e["subset"], e["arm"], e["step"], e["seed"])):
        seen = (f"{e.get('pretrain_images', 0):,} + {e.get('finetune_images', 0):,}" if e["arm"] != "floor" else "-")
        times = (f"{e.get('pretrain_train_s', 0) / 60:.1f} + {e.get('finetune_train_s', 0) / 60:.1f} min"
                 if e["arm"] != "floor" else "-")
        lines.append(f"| {e['arm']} | {e['subset']} | {e['step']} | {e['seed']} | {e['n']} | {e['fid']:.2f} | "
                     f"{e['kid'] * 1e3:.2f} | {seen} | {times} | {e['eval_s'] / 60:.1f} min |")
    lines += ["", "## Runs", "", "| run | steps | images | training time | time limit |", "|---|---:|---:|---:|---:|"]
    for name, r in data["runs"].items():
        limit = f"{r['time_limit']:.0f} s" if r.get("time_limit") else "-"
        lines.append(f"| {name} | {r['steps']} | {r['images']:,} | {r['train_s'] / 60:.1f} min | {limit} |")
    lines += ["", "## Stages", "", "| stage | wall time | finished | machine |", "|---|---:|---|---|"]
    for name, st in data["stages"].items():
        lines.append(f"| {name} | {st['seconds'] / 60:.1f} min | {st['finished']} | {st.get('machine', '-')} |")
    text = "\n".join(lines) + "\n"

    targets = [out] + ([record] if record else [])
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(text)
    _curves(data, out / "curves.png", floor_fid, floor_kid)
    grids = _grids(data, out)
    if record:
        shutil.copyfile(out / "curves.png", record / "curves.png")
        for g in grids:
            shutil.copyfile(g, record / g.name)
    return text


ARMS_PRETRAINED = ("maskdm-lfw", "dsm-lfw", "maskdm-celeba")


def _curves(data: dict, path: Path, floor_fid: list[float], floor_kid: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, floor, scale, label in ((axes[0], "fid", floor_fid, 1.0, "FID"),
                                            (axes[1], "kid", floor_kid, 1e3, "KID x1e3")):
        for arm in ("scratch",) + ARMS_PRETRAINED:
            curve = _curve(data, arm, "10%", s["seeds"][0], metric)
            if curve:
                xs, ys = zip(*curve)
                ax.plot(xs, [y * scale for y in ys], "o-", color=COLORS[arm], label=LABELS[arm])
                extra = [(e["step"], e[metric] * scale) for e in _evals(data, arm=arm, subset="10%")
                         if e["seed"] != s["seeds"][0]]
                if extra:
                    ax.plot(*zip(*extra), "x", color=COLORS[arm], alpha=0.7)
        if floor:
            lo, hi = min(floor) * scale, max(floor) * scale
            ax.axhspan(lo - 1e-9, hi + 1e-9, color="black", alpha=0.15, label="real vs real (floor)")
        ax.set_xlabel("fine-tune step (10% subset)")
        ax.set_ylabel(f"{label}, N = {s['n']}")
        ax.set_xscale("log", base=2)
        steps = sorted({e["step"] for e in _evals(data, subset="10%")})
        if steps:
            ax.set_xticks(steps, [str(x) for x in steps])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Transfer study, {s['scale']} scale ({s['size']} px): o seed {s['seeds'][0]}, x other seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grids(data: dict, out: Path) -> list[Path]:
    from PIL import Image

    from trainer.core.images import save_grid

    s = data["settings"]
    written = []
    for e in data["evals"]:
        F = s["finetune_steps"]
        if e["arm"] == "floor" or e["seed"] != s["seeds"][0] or e["step"] not in (F, 4 * F):
            continue
        if e["step"] == 4 * F and e["arm"] != "scratch":
            continue
        folder = out / e["samples"]
        path = out / f"grid-{e['arm']}-{e['subset'].rstrip('%')}{'-4F' if e['step'] == 4 * F else ''}.png"
        files = sorted(folder.glob("*.png"))[:GRID] if folder.is_dir() else []
        if files:
            images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
            zoom = max(1, 96 // images.shape[1])
            save_grid(np.repeat(np.repeat(images, zoom, axis=1), zoom, axis=2), path)
        if path.exists():
            written.append(path)
    return written
