#!/usr/bin/env bash
# The GPU figures of issue 14 in one go, for a session lent a GPU machine (H100/H200, ~15 minutes in all):
#
#     bash bench/gpu_suite.sh [OUT]            # OUT default: $OUT or gpu-results/
#
# Expected duration on one H100/H200: install ~3 min, train_step and optimizer_step ~3 min, trainer_overhead ~5 min, the 2-minute
# training runs ~5 min with their sharding and sampling: about 15 minutes. Every table is written to OUT as it
# finishes (OUT/*.md, with OUT/log.txt the whole output), so a run stopped early keeps what it measured; put the
# tables in docs/performance.md with the GPU's name and the date. Stages can be skipped: SKIP="install train_step".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }

if ! skip install; then
  stage "install (a CUDA 12.x torch build is expected on the machine; the project with its test extra)"
  python -m venv .venv-gpu && . .venv-gpu/bin/activate && pip install -q -e ".[test]" || exit 1
else
  [ -d .venv-gpu ] && . .venv-gpu/bin/activate
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

if ! skip train_step; then
  stage "bare model step: S/B/L x fp16/bf16 x mask 0/0.5/0.7/0.9 (img/s, ratio to unmasked, memory, MFU)"
  python bench/train_step.py --device cuda --dtype fp16 bf16 --presets S B L --batch 32 --steps 5 --repeats 3 \
    | tee "$OUT/train_step.md"
  stage "the optimiser step: torch AdamW vs ZeRO-0/1/2, fused vs per tensor (S, B, L)"
  python bench/optimizer_step.py --device cuda --presets S B L --batch 8 | tee "$OUT/optimizer_step.md"
  stage "activation checkpointing: memory saved vs time lost (B, bf16)"
  python bench/train_step.py --device cuda --dtype bf16 --presets B --batch 32 --steps 5 --repeats 3 \
    --grad-checkpoint both | tee "$OUT/grad_checkpoint.md"
fi

if ! skip trainer_overhead; then
  stage "the real loop vs the bare step, with the per-micro-batch breakdown"
  python bench/trainer_overhead.py --device cuda --presets S B L --dtype bf16 fp16 --rates 0 0.9 --batch 32 \
    --workers 8 --steps 20 --out "$OUT/overhead" | tee "$OUT/trainer_overhead.md"
fi

if ! skip train_B; then
  stage "2 minutes of B at 90% masking, from JPEG-only and from DWT shards, then a sample grid"
  python -m trainer.quickstart --help > /dev/null  # imports work
  python - "$OUT/faces" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
from pipeline.synthetic import synthetic_faces
out = Path(sys.argv[1])
for i, face in enumerate(synthetic_faces(4096, size=288, seed=0)):
    p = out / f"id{i % 64:02d}" / f"{i:05d}.jpg"
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(face).save(p, quality=95)
EOF
  python -m pipeline.shard folder --src "$OUT/faces" --out "$OUT/shards-jpeg" --size 256 --no-dwt --workers 8
  python -m pipeline.shard folder --src "$OUT/faces" --out "$OUT/shards-dwt" --size 256 --workers 8
  for kind in jpeg dwt; do
    deepspeed --num_gpus 1 trainer/pretrain.py --config configs/vggface2_pretrain_S.yaml \
      --deepspeed_config ds_configs/zero2_bf16.json --run-dir "$OUT/run-B-$kind" --time-limit 120 \
      --set model.preset=B --set model.input=dwt --set model.image_size=256 --set "data.sources=[$OUT/shards-$kind]" \
      --set data.workers=8 --set train.global_batch=128 --set train.micro_batch=128 --set train.log_every=20 \
      --set train.sample_every=1000000 --set train.ckpt_every=1000000 --set train.sample_n=16
    tail -n 3 "$OUT/run-B-$kind/metrics.jsonl"
  done | tee "$OUT/train_B.md"
  python -m trainer.sample --ckpt "$OUT/run-B-dwt" --n 16 --steps 50 --out "$OUT/samples-B" --dtype bf16
fi
stage "done: tables in $OUT"
