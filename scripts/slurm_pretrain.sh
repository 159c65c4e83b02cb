#!/bin/bash
# Multi-node MaskDM training under Slurm: one task per GPU, started by srun, no ssh (docs/cluster.md, "Slurm").
#
#   mkdir -p logs
#   sbatch --nodes=2 scripts/slurm_pretrain.sh CONFIG DS_CONFIG RUN_DIR [trainer args...]
#   sbatch --nodes=2 scripts/slurm_pretrain.sh configs/vggface2_pretrain_S.yaml ds_configs/zero2_fp16.json \
#       /shared/runs/vggface2-S --set train.micro_batch=16
#   MASKDM_SCRIPT=trainer/finetune.py sbatch scripts/slurm_pretrain.sh CONFIG DS_CONFIG RUN_DIR --init /shared/runs/X
#
# Submit from the repository root (or set MASKDM_REPO); RUN_DIR must be on a filesystem every node sees. Submitting
# the same command again resumes the run from its latest checkpoint (the trainer's `--resume auto`), on any number
# of nodes: a checkpoint written by another number of GPUs is converted to a universal checkpoint first.
#
# Why srun and not `deepspeed --hostfile`: srun starts, tracks and kills every rank itself (no passwordless ssh or
# pdsh between compute nodes, processes stay inside the job's cgroups and accounting, and containers work: each task
# starts inside its own). DeepSpeed's `--launcher slurm` also runs plain `python` under srun, but then discovers
# ranks through mpi4py, which the image does not carry. DeepSpeed needs only the torchrun-style variables below:
# when RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are all set, deepspeed.init_distributed() uses them.
#
# Settings (environment variables; the defaults suit a bare-metal or venv install):
#   MASKDM_SCRIPT   trainer/pretrain.py (default) or trainer/finetune.py
#   MASKDM_EXEC     a command to prefix to python on every task, e.g. "apptainer exec --nv /shared/maskdm.sif"
#   SRUN_EXTRA      more srun options, e.g. pyxis: "--container-image=/shared/maskdm.sqsh --container-mounts=/shared
#                   --container-workdir=$PWD" (the checkout's path, mounted at the same place)
#   MASTER_PORT     rendezvous port on the first node (default: derived from the job id)
#   DEEPSPEED_TIMEOUT  minutes a collective may wait before the job fails (default here 60; DeepSpeed's own is 10)
#   MASKDM_PREFLIGHT   0 skips the --dry-run check before the launch
#
# Nodes, GPUs and time: the #SBATCH lines below are defaults; sbatch's own options override them. Keep one task per
# GPU (--ntasks-per-node equal to the GPUs per node) and size --cpus-per-task for data.workers + 2 per rank;
# --mem=0 asks for all of each node's memory (the job holds every GPU of its nodes anyway).
#SBATCH --job-name=maskdm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=USR1@300      # 5 min before the time limit: every task saves a checkpoint and stops
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

config=${1:?usage: sbatch scripts/slurm_pretrain.sh CONFIG DS_CONFIG RUN_DIR [trainer args...]}
ds_config=${2:?DS_CONFIG: a DeepSpeed JSON from ds_configs/}
run_dir=${3:?RUN_DIR: the run directory, on a filesystem shared by all nodes}
shift 3
script=${MASKDM_SCRIPT:-trainer/pretrain.py}

[[ -n ${SLURM_JOB_ID:-} ]] || die "run this with sbatch (or inside salloc); it reads Slurm's job variables"
# sbatch runs a copy of this file from its spool directory, so paths are relative to where the job was submitted.
cd "${MASKDM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f $script ]] || die "$script not found under $PWD: submit from the repository root or set MASKDM_REPO"

# --- Slurm's allocation -> the variables torch.distributed and DeepSpeed read ------------------------------------
# Nodes: the compact list ("gpu[01-04]") expanded to one host name per line; the first host runs rank 0 and the
# rendezvous store (MASTER_ADDR). The store carries only the start-up handshake; NCCL picks its own interfaces
# (NCCL_SOCKET_IFNAME, NCCL_IB_HCA: docs/cluster.md).
nodelist=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?set by Slurm}") || die "scontrol: no node list"
mapfile -t hosts <<< "$nodelist"
export MASTER_ADDR=${hosts[0]}
# A port per job (10000-29999, below Linux's ephemeral range), so two jobs sharing a first node do not collide.
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
# One rank per task: WORLD_SIZE is the job's task count (nodes x --ntasks-per-node).
world_size=${SLURM_NTASKS:?SLURM_NTASKS unset: give --ntasks-per-node}
# Tasks per node: --ntasks-per-node, else the first node's count in SLURM_TASKS_PER_NODE ("8(x2)", "8,4").
tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}
# GPUs per node as Slurm granted them (SLURM_GPUS_ON_NODE; absent if GPUs were not requested through Slurm).
gpus_per_node=${SLURM_GPUS_ON_NODE:-$tasks_per_node}
[[ $gpus_per_node == "$tasks_per_node" ]] ||
    die "$tasks_per_node tasks but $gpus_per_node GPUs per node: one task per GPU (--ntasks-per-node=$gpus_per_node)"

# Slurm 22.05 to 23.02 do not hand sbatch's --cpus-per-task on to srun (23.11 does again): pass it explicitly.
cpus_per_task=${SLURM_CPUS_PER_TASK:-1}
# PyTorch's CPU thread pool (and rank 0's CPU work) sized to the task's cores instead of the whole node's.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}
# The process-group timeout, in minutes (DeepSpeed reads it; default 10). Ranks wait in a collective while rank 0
# alone converts a checkpoint for a new GPU count or draws the sample grid, which can take longer than 10 minutes.
export DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-60}
# Site-specific NCCL settings belong here or in the environment you submit from (srun passes it on), e.g.
#   export NCCL_DEBUG=INFO NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5_0,mlx5_1   (see docs/cluster.md)

# Word lists; expanded below as ${a[@]+"${a[@]}"}, which is empty when unset even under `set -u` in bash 4.2.
read -r -a exec_prefix <<< "${MASKDM_EXEC:-}"
read -r -a srun_extra <<< "${SRUN_EXTRA:-}"

echo "maskdm: job $SLURM_JOB_ID, ${#hosts[@]} nodes (${hosts[*]}) x $tasks_per_node GPUs = world size $world_size;" \
     "rank 0 and rendezvous on $MASTER_ADDR:$MASTER_PORT; $script --run-dir $run_dir" >&2

# --- preflight: config, batch arithmetic for this world size, data reachable (manifests), resume plan -----------
# One task, inside the same container as the ranks: it fails in seconds on what would otherwise fail after start-up
# on every rank (a batch that does not divide, a missing manifest, refused bucket credentials).
if [[ ${MASKDM_PREFLIGHT:-1} != 0 ]]; then
    srun --nodes=1 --ntasks=1 --cpus-per-task="$cpus_per_task" ${srun_extra[@]+"${srun_extra[@]}"} \
        ${exec_prefix[@]+"${exec_prefix[@]}"} \
        python -u "$script" --config "$config" --deepspeed_config "$ds_config" --run-dir "$run_dir" "$@" \
        --dry-run --world-size "$world_size"
fi

# --- training: one task per GPU ------------------------------------------------------------------------------------
# Each task maps its own Slurm ids to the torchrun-style variables (they differ per task, so they are set inside it):
#   RANK = SLURM_PROCID (0 .. world-1), WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID (0 .. tasks per node-1).
# LOCAL_RANK picks the GPU (cuda:LOCAL_RANK). Where the site binds each task to its own GPU (CUDA_VISIBLE_DEVICES
# holds a single id), that GPU is cuda:0 for the task, so LOCAL_RANK becomes 0.
# --kill-on-bad-exit: one rank failing ends the step at once instead of leaving the others blocked in NCCL.
# shellcheck disable=SC2016  # the $-expressions are expanded by each task's bash, not here
task='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
if [[ ${CUDA_VISIBLE_DEVICES:-} =~ ^[^,]+$ ]]; then export LOCAL_RANK=0; fi
exec "$@"'
srun --kill-on-bad-exit=1 --cpus-per-task="$cpus_per_task" ${srun_extra[@]+"${srun_extra[@]}"} \
    ${exec_prefix[@]+"${exec_prefix[@]}"} \
    bash -c "$task" maskdm-rank \
    python -u "$script" --config "$config" --deepspeed_config "$ds_config" --run-dir "$run_dir" "$@"
