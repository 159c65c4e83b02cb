"""Start a training command under the real DeepSpeed launcher on this machine, on its GPUs or on CPU ranks.

    launch("pretrain.py", run_dir, ranks=2, config=Path("configs/quickstart.yaml"), sets=["train.steps=10"])

Used by the jobs that chain the project's commands (`trainer.quickstart`, `experiments.transfer`): CPU-only
machines get `DS_ACCELERATOR=cpu` and each rank an equal share of the cores (more threads than cores spin-wait);
GPUs train in bf16 from Ampere on and in fp16 before it (V100). The command line is printed first, and DeepSpeed's
CPU shared-memory buffers are released after the run, also after a failed one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trainer.train.jobs import REPO

__all__ = ["has_cuda", "launch", "ds_config_for_machine"]


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def ds_config_for_machine() -> Path:
    """ds_configs/ file for this machine: fp32 on CPU, bf16 on Ampere+ GPUs, fp16 with loss scaling before."""
    if not has_cuda():
        return REPO / "ds_configs" / "cpu_fp32.json"
    import torch

    bf16 = torch.cuda.get_device_capability(0)[0] >= 8
    return REPO / "ds_configs" / ("zero2_bf16.json" if bf16 else "zero2_fp16.json")


def launch(script: str, run_dir: Path, ranks: int, *, config: Path, sets: list[str] = (), extra: list[str] = (),
           what: str = "") -> None:
    """Run `deepspeed --num_gpus RANKS trainer/SCRIPT --config CONFIG --run-dir RUN_DIR [--set ...] EXTRA`;
    SystemExit naming the run directory if it fails."""
    from trainer.train.distributed import free_port, release_shm

    port = free_port()
    gpu = has_cuda()
    env = dict(os.environ) if gpu else {**os.environ, "DS_ACCELERATOR": "cpu"}
    if not gpu and "OMP_NUM_THREADS" not in env:  # each rank's share of the cores: more threads than cores spin-wait
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    # --log_level error: the runner's and launcher's own INFO lines (its command line, world info) and its warning
    # that a single machine has no hostfile; the ranks' output and warnings are untouched
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "error", "--num_gpus", str(ranks),
           "--master_port", str(port), str(REPO / "trainer" / script), "--config", str(config),
           "--deepspeed_config", str(ds_config_for_machine()), "--run-dir", str(run_dir), *extra]
    for item in sets:
        cmd += ["--set", item]
    print(f"  $ {'DS_ACCELERATOR=cpu ' if not gpu else ''}deepspeed {' '.join(cmd[5:])}", flush=True)
    try:
        code = subprocess.run(cmd, env=env).returncode
    finally:
        release_shm(port)
    if code != 0:
        raise SystemExit(f"error: {script} failed{' (' + what + ')' if what else ''}; its log is above, its run "
                         f"directory is {run_dir}")
