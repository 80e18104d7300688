#!/usr/bin/env bash
# One go on a CUDA machine, most important first, each step under its own time limit (a failing or slow step does
# not stop the next): the CUDA-marked tests, benchmarks/gpu_check.py (every bitsandbytes mode against Lightning's
# own BitsandbytesPrecision, the weight-only modes, the CUDA int8 kernels), the QLoRA memory/step-time comparison
# on the 1B Llama shape, and with 2+ GPUs the sharded benchmark.
#   bash scripts/gpu_check.sh [WHEEL_DIR] [EXTRA_SITE_DIR]
# WHEEL_DIR (optional) holds wheels of what the GPU image lacks (bitsandbytes, jsonargparse, ...): installed into
# /tmp/site, leaving the image's torch alone. EXTRA_SITE_DIR (optional) goes on PYTHONPATH as it is.
# The log and the reports go to $OUT if it is set (the device tool), else runs/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -n "${1:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ -n "${2:-}" ]; then export PYTHONPATH=$PWD/$2:$PYTHONPATH; fi

step() {  # step LIMIT_S COMMAND...: run it, log it, say how it ended
  local limit=$1 start=$SECONDS
  shift
  echo "=== $* (limit ${limit} s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}
keep() { cp benchmarks/results/"$1".md benchmarks/results/"$1".csv "$OUT"/ 2>/dev/null || true; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
python3 -c "import torch, transformers, peft, bitsandbytes, lightning; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, \
'lightning', lightning.__version__)" 2>&1 | tee -a "$LOG"
step 240 python3 -m pytest -m cuda -q -rfEs -p no:cacheprovider tests/test_cuda.py tests/test_woq.py
step 150 python3 benchmarks/gpu_check.py
keep gpu_check
step 200 python3 benchmarks/qlora_resources.py --model llama-1b --accelerator cuda --steps 10
keep qlora_resources_llama-1b_cuda
step 150 python3 benchmarks/qlora_resources.py --model llama-1b --accelerator cuda --steps 10 \
  --gradient_checkpointing true
keep qlora_resources_llama-1b_cuda_checkpointing
# where the recipe's first CUDA step goes (2.75 s against ~0.3 s for the next ones on an H100); the profiler's
# table takes a while to print, hence the limit
step 300 python3 benchmarks/profile_step.py --model llama-1b --accelerator cuda --steps 3 --top 25 --first_step true
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # sharded QLoRA (FSDP2, nccl) per-rank memory against DDP
  step 400 python3 -m pytest -m cuda -q -rfEs -p no:cacheprovider tests/test_cuda.py -k two_gpus
  step 600 python3 benchmarks/qlora_sharded.py --model llama-1b --accelerator cuda --devices 2 --steps 10
  keep qlora_sharded_llama-1b_cuda
fi
