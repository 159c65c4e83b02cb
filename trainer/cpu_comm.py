"""DeepSpeed's CPU communication op, announced (or built ahead) instead of compiled in silence.

With the CPU accelerator (`DS_ACCELERATOR=cpu`, gloo) DeepSpeed's comm backend JIT-compiles its shared-memory
all-reduce, the C++ extension `deepspeed_shm_comm`, the first time a process initialises distributed training on a
machine: a minute or more on 2 cores (measured in docs/performance.md), with no word to the user, then cached in
torch's extension folder (`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions/py*_*/`). DeepSpeed has no
ahead-of-time switch for it short of rebuilding DeepSpeed itself (`DS_BUILD_SHM_COMM=1 pip install deepspeed`), so:

- `announce_cpu_comm_build(log)`: the loop calls it on local rank 0 before `deepspeed.init_distributed()` and it
  says what is about to happen when the op is not built yet;
- `build_cpu_comm_op(log)`: the quickstart builds it in a child process before its first launch, with the time it
  took, so the launches that follow start at once.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["OP_NAME", "cpu_comm_build_dir", "cpu_comm_op_built", "announce_cpu_comm_build", "build_cpu_comm_op"]

OP_NAME = "deepspeed_shm_comm"

_BUILD = f"""
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
import deepspeed.ops
if deepspeed.ops.__compatible_ops__.get({OP_NAME!r}, False):
    ShareMemCommBuilder().load()
"""


def cpu_comm_build_dir() -> Path:
    """The folder torch's JIT builder uses for the op (the same rule as torch.utils.cpp_extension)."""
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        if torch.version.hip is not None:
            acc = f"rocm{torch.version.hip.replace('.', '')}"
        root = os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{acc}")
    return Path(root) / OP_NAME


def cpu_comm_op_built() -> bool:
    return bool(glob.glob(str(cpu_comm_build_dir() / f"{OP_NAME}*.so")))


def _uses_cpu_accelerator() -> bool:
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"] == "cpu"
    import torch

    return not torch.cuda.is_available()


def announce_cpu_comm_build(log=print) -> bool:
    """Say, before DeepSpeed starts compiling, that the first CPU launch on this machine builds its comm op.
    Returns whether it will be built."""
    if not _uses_cpu_accelerator() or cpu_comm_op_built():
        return False
    log(f"first DeepSpeed CPU launch on this machine: compiling its communication op {OP_NAME} (once; about "
        f"a minute or two on 2 cores; cached in {cpu_comm_build_dir()})")
    sys.stdout.flush()
    return True


def build_cpu_comm_op(log=print) -> float | None:
    """Build the op now, in a child process with DS_ACCELERATOR=cpu, if it is not built yet. Returns the seconds it
    took, or None when there was nothing to build."""
    if cpu_comm_op_built():
        return None
    log(f"  compiling DeepSpeed's CPU communication op {OP_NAME} (first launch on this machine only; about a "
        f"minute or two on 2 cores) into {cpu_comm_build_dir()} ...")
    sys.stdout.flush()
    start = time.time()
    r = subprocess.run([sys.executable, "-c", _BUILD], env={**os.environ, "DS_ACCELERATOR": "cpu"},
                       capture_output=True, text=True)
    if r.returncode != 0:  # the launch would compile it again and fail with the full log: show the end of it
        raise SystemExit(f"error: building DeepSpeed's {OP_NAME} failed (a C++ compiler and ninja are needed):\n"
                         f"{(r.stdout + r.stderr)[-3000:]}")
    seconds = time.time() - start
    log(f"  built in {seconds:.0f} s")
    return seconds
