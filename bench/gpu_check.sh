#!/usr/bin/env bash
# The GPU checks on a one-GPU machine, in under 10 minutes: the GPU install, then the tests marked `gpu`
# (a learner step on the device with bf16 and a reference, vLLM on the GPU equal to HF after an in-place update,
# and, given two GPUs, a bucket broadcast over the NCCL weight group).
# Usage: bash bench/gpu_check.sh   (from the repository root, on a CUDA machine with internet or a wheel cache)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q -e '.[gpu,test]'
nvidia-smi --query-gpu=name,memory.total --format=csv
export SCRATCHPAD_CACHE="$PWD/.venv-gpu/scratchpad-cache"
timeout 600 python -m pytest -q -m gpu tests/test_gpu.py -rA
