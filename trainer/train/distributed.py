"""Process groups: the launcher's environment read once (`distributed_context`), DeepSpeed's CPU shared-memory
buffers freed after a run (`release_shm`), and DeepSpeed's CPU communication op, announced (or built ahead)
instead of compiled in silence.

With the CPU accelerator (`DS_ACCELERATOR=cpu`, gloo) DeepSpeed's comm backend JIT-compiles its shared-memory
all-reduce, the C++ extension `deepspeed_shm_comm`, the first time a process initialises distributed training on a
machine: a minute or more on 2 cores (measured in docs/performance.md), with no word to the user, then cached in
torch's extension folder (`$TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions/py*_*/`). DeepSpeed has no
ahead-of-time switch for it short of rebuilding DeepSpeed itself (`DS_BUILD_SHM_COMM=1 pip install deepspeed`), so:

- `announce_cpu_comm_build(log)`: the loop calls it on local rank 0 before `deepspeed.init_distributed()` and it
  says what is about to happen when the op is not built yet;
- `build_cpu_comm_op(log)`: the quickstart builds it in a child process before its first launch, with the time it
  took, so the launches that follow start at once.

`quiet_known_noise()` drops, in each rank, messages that every CPU launch printed once per rank and that say
nothing to the user: torch's "No CUDA runtime is found, using CUDA_HOME=..." (logged when DeepSpeed loads the op
through torch.utils.cpp_extension on a machine without a GPU) and the FutureWarning that DeepSpeed 0.19's comm layer
calls the deprecated `torch.distributed.all_gather_into_tensor`; `init_distributed_quietly()` drops DeepSpeed's
"deepspeed_shm_comm_op built successfully", printed at every launch even when nothing was built. Only those exact
messages: every other line and warning passes.
"""
from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

__all__ = ["OP_NAME", "cpu_comm_build_dir", "cpu_comm_op_built", "announce_cpu_comm_build", "build_cpu_comm_op",
           "quiet_known_noise", "init_distributed_quietly", "distributed_context", "release_shm", "free_port",
           "LauncherWatch", "end_job_on_failure", "group_processes"]


def distributed_context():
    """(rank, world, device) from the launcher's environment (torchrun / deepspeed set RANK, WORLD_SIZE,
    LOCAL_RANK); a process group is started for multi-process launches (gloo on CPU, nccl on GPUs)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: a launch's MASTER_PORT (the OS picks it; the launch binds it soon after)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_shm(port: str | int | None, addr: str = "127.0.0.1", rank: int | str = "*") -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves its buffers in /dev/shm (~69 MB per rank per run, never
    freed): remove those of one run (its master address and port)."""
    if port:
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass

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
    if root is None:  # torch.utils.cpp_extension.get_default_build_root, without importing that module (its import
        # logs "No CUDA runtime is found" on CPU machines)
        from torch._appdirs import user_cache_dir

        base = os.path.realpath(user_cache_dir(appname="torch_extensions"))
        acc = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
        if torch.version.hip is not None:
            acc = f"rocm{torch.version.hip.replace('.', '')}"
        root = os.path.join(base, f"py{sys.version_info.major}{sys.version_info.minor}_{acc}")
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


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_noise() -> None:
    """Silence the two per-rank messages described in the module docstring (idempotent)."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if _uses_cpu_accelerator():
        log = logging.getLogger("torch.utils.cpp_extension")
        if not any(isinstance(f, _DropMessage) for f in log.filters):
            log.addFilter(_DropMessage("No CUDA runtime is found"))


def init_distributed_quietly() -> None:
    """`deepspeed.init_distributed()` with its "... built successfully" print dropped (other output passes)."""
    import deepspeed

    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            deepspeed.init_distributed()
    finally:
        kept = [line for line in buf.getvalue().splitlines(keepends=True)
                if not (OP_NAME in line and "built successfully" in line)]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


# --- the job's processes: a launcher that is gone, a rank that fails --------------------------------------------

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process from /proc (Linux); None if it is gone or unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": the name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[2])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class LauncherWatch:
    """Whether this rank's DeepSpeed launcher is gone. On a node, `deepspeed` (the runner) starts
    `deepspeed.launcher.launch`, which starts the ranks. The runner has no SIGTERM handler on one node: a SIGTERM or
    a SIGKILL to the `deepspeed` command's PID ends it alone, and its launcher and ranks would train on unattended;
    a SIGKILLed launcher orphans its ranks. So each rank records its launcher and the launcher's parent at start and
    asks, once per optimiser step, whether either has gone (the rank or the launcher re-parented): the loop then
    treats it as a stop signal (finish the step, save, stop). Only under DeepSpeed's launcher on Linux: a rank of
    another launcher (torchrun forwards signals itself) or of none is never stopped by this."""

    def __init__(self):
        self.launcher = os.getppid()
        stat = _proc_stat(self.launcher) if "deepspeed.launcher.launch" in _cmdline(self.launcher) else None
        self.starter = stat[1] if stat else None

    def gone(self) -> bool:
        if self.starter is None:
            return False
        if os.getppid() != self.launcher:
            return True
        stat = _proc_stat(self.launcher)
        return stat is None or stat[1] != self.starter


def end_job_on_failure(main):
    """Run a rank's `main()`; if it raises, print the error (a traceback, or a SystemExit's message), kill this
    rank's own children (DataLoader workers) and leave at once with os._exit. A rank that failed must exit for the
    launcher to end the job (DeepSpeed's launcher terminates the other ranks when one exits non-zero), but an
    ordinary exit can block: joining a DataLoader worker, or a process group's threads, while another rank waits
    in a collective forever."""
    import multiprocessing
    import traceback

    try:
        return main()
    except BaseException as e:  # noqa: BLE001 (SystemExit and KeyboardInterrupt end the job too)
        code = e.code if isinstance(e, SystemExit) else 1
        if isinstance(e, SystemExit) and (code is None or code == 0):
            raise
        if isinstance(e, SystemExit):
            if not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        else:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(code)


def group_processes(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid` (Linux: /proc); an empty list once it is gone."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (stat := _proc_stat(int(d.name))) and stat[2] == pgid and stat[0] != "Z":
            pids.append(int(d.name))
    return pids
