#!/usr/bin/env bash
# One go on a CUDA machine: the CUDA-marked tests, the GPU footprint/latency check of every mode, and the
# QLoRA vs 16-bit LoRA vs transformers+peft memory/step-time comparison on a ~1.2B Llama-shaped model.
#   bash scripts/gpu_check.sh [WHEEL_DIR]
# WHEEL_DIR (optional) holds wheels of what the GPU image lacks (bitsandbytes, jsonargparse); they are installed
# without touching the image's own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${1:-}" ]; then
  python -m pip install -q --no-deps "$1"/*.whl
fi
python -m pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py
python benchmarks/gpu_check.py
python benchmarks/qlora_resources.py --model llama-1b --accelerator cuda --steps 20
python benchmarks/qlora_resources.py --model llama-1b --accelerator cuda --steps 20 --gradient_checkpointing true
# 2+ GPUs: sharded QLoRA (FSDP2, nccl) per-rank memory against DDP
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  python benchmarks/qlora_sharded.py --model llama-1b --accelerator cuda --devices 2 --steps 10
fi
