#!/usr/bin/env bash
# The GPU checks, in under 8 minutes on one GPU: the tests marked `gpu` (attention kernels with fully
# masked rows, the fused loss, fused Adam with clipping under bf16-mixed and 16-mixed, cached decoding),
# then the base-size throughput benchmark in bf16, whose table goes to benchmarks/results/gpu/.
#
#   bash benchmarks/gpu_check.sh [MULTI30K_FOLDER]    (default: ../shared/data/multi30k)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/multi30k}
python - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("error: gpu_check.sh needs a CUDA device, and torch.cuda.is_available() is False; run it on a GPU machine.")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
PY
[ -d "$data" ] || { echo "error: no Multi30k folder at $data; pass its path as the first argument." >&2; exit 2; }
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests
timeout 300 python benchmarks/throughput.py --preset base --precision bf16 --device cuda --data "$data" \
    --output-dir benchmarks/results/gpu
