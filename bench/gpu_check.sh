#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine with a CUDA GPU (results: bench/RESULTS.md).
#
#   bash bench/gpu_check.sh [DATA_DIR]      # logs and tables under $OUT (default /tmp/nnd-gpu)
#
# Needs python3 with a CUDA torch and this project's dependencies importable (PYTHONPATH), and
# eai-sparsify for the comparison. Each step has its own time limit and log; a failed step does not
# stop the others. Order: the GPU tests, then the harvest the benchmarks read, then the benchmarks.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nnd-gpu}
DATA=${1:-/tmp/nnd-gpu-data}
mkdir -p "$OUT" "$DATA"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=".:${PYTHONPATH:-}"
STORE=$DATA/harvest/smollm2-135m/bbc/train-ctx128.zarr
CKPTS=$DATA/train/smollm2-135m/bbc/ctx128/transcoder

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its log, print its tail
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  timeout "$limit" "$@" >"$OUT/step.log" 2>&1
  local rc=$?
  { echo "===== $name (rc=$rc, $((SECONDS - t0)) s)"; cat "$OUT/step.log"; } >>"$OUT/all.log"
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/step.log"
  rm -f "$OUT/step.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$OUT/all.log"
step tests 110 python3 -m pytest -q -rs tests/test_gpu.py
step harvest 130 python3 bench/bench_gpu.py harvest --data-dir "$DATA" --tokens 655360 --layers 3
step sparsify 130 python3 bench/bench_sparsify.py --device cuda --store "$STORE" --layer 3 --tokens 524288
step train 60 python3 -m stages.cli train --device cuda --model topk,batchtopk,jumprelu --k 32 --layers 3 \
  --tokens 524288 --data-dir "$DATA" --wandb disabled --no-progress
step train_meta 10 python3 -c "
import json, glob
for p in sorted(glob.glob('$CKPTS/*/config.json')):
    m = json.load(open(p))['metadata']
    print(p.split('/')[-2], 'tokens/s', round(m['tokens_per_s_run']), 'fvu', round(m['final']['fvu'], 4), 'dead', m['dead_fraction'])"
step evaluate 60 python3 -m stages.cli evaluate --device cuda --ckpt "$CKPTS" --eval-tokens 4096 --data-dir "$DATA" --no-progress
step dtype 45 python3 bench/bench_gpu.py dtype --data-dir "$DATA"
step decode 25 python3 bench/bench_gpu.py decode
step loop 60 python3 bench/bench_gpu.py loop --data-dir "$DATA"
cat "$OUT/summary.txt"
