"""Metric-vs-step curves of training runs, from the evaluation records in their metrics.jsonl
(`python -m trainer.evaluate --plot RUN_DIR ... --out curves.png`)."""
from __future__ import annotations

from pathlib import Path

from trainer.train.rundir import RunDir

__all__ = ["plot_runs"]


def plot_runs(runs: list[str], out: str | Path, metrics=("fid",)) -> Path:
    """Metric-vs-step curves (one panel per metric, one line per run and protocol) from the runs' metrics.jsonl."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('error: --plot needs matplotlib: pip install matplotlib (or pip install -e ".[eval]")') \
            from None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    drawn = 0
    for ax, metric in zip(axes[0], metrics):
        for run in runs:
            if not RunDir(run).metrics.is_file():
                raise SystemExit(f"error: --plot {run}: no metrics.jsonl (not a run directory)")
            series: dict[str, list] = {}
            for rec in RunDir(run).read_metrics():
                if metric in rec and rec.get("step") is not None:
                    impl = "" if rec.get("fid_impl", "tf") == "tf" or metric == "swd" else f", {rec['fid_impl']}"
                    label = f"{Path(run).name} (N={rec.get('n')}, {rec.get('sampler', '')}{rec.get('steps', '')}{impl})"
                    series.setdefault(label, []).append((rec["step"], rec[metric]))
            for label, points in series.items():
                points.sort()
                ax.plot(*zip(*points), marker="o", label=label)
                drawn += 1
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.upper() + (" (x1e3)" if metric == "swd" else ""))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if not drawn:
        raise SystemExit(f"error: --plot: no {'/'.join(metrics)} records in {runs}: run trainer.evaluate --ckpt first")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
