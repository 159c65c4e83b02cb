#!/bin/bash
# Shard a corpus with a Slurm job array: task I of P writes the shards s with s % P == I into the same OUT;
# the last task to finish writes manifest.json (or run `python -m pipeline.merge OUT` afterwards).
#
#   sbatch --array=0-7 scripts/slurm_shard_array.sh vggface2 /data/vggface2 s3://bucket/vggface2-256
#
# When to use it: one node shards fast enough for most corpora (about 200 images/s per core for
# 1024 -> 256 + DWT, docs/performance.md: VGGFace2's 3.3M small JPEGs on one 32-core node take minutes to an
# hour, mostly reading the source). Use an array when the sources are spread over nodes' local disks, when a
# node's I/O is the limit, or to use idle allocation. Every task must see the same --src and pass the same flags.
#SBATCH --job-name=maskdm-shard
#SBATCH --cpus-per-task=32
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=logs/shard-%A_%a.out
set -euo pipefail
corpus=${1:?corpus: vggface2 | celebahq | folder}
src=${2:?source root}
out=${3:?output folder or s3:// URL}
shift 3
python -m pipeline.shard "$corpus" --src "$src" --out "$out" \
    --workers "${SLURM_CPUS_PER_TASK:-8}" \
    --part "${SLURM_ARRAY_TASK_ID:-0}/${SLURM_ARRAY_TASK_COUNT:-1}" "$@"
