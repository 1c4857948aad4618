#!/usr/bin/env bash
# GPU readiness check for a lent CUDA machine (issue 11, item 5). CI never runs it.
#
#   scripts/gpu_check.sh            # installs the CUDA pins into .venv-cuda, then checks
#
# 1. benchmarks/sync_check.py: DimGrow search steps (summed and per-feature consumers, with
#    grow/shrink between blocks) under torch.cuda.set_sync_debug_mode("error").
# 2. benchmarks/overhead.py on the GPU (DimGrow step vs a plain TorchRec EBC step).
# 3. The real search (DMP + CUDA FBGEMM + nccl) on the Criteo sample, on 2 ranks when 2 GPUs
#    are visible (the search loop itself reads the loss and the gates on the host each step).
# Results land in $OUT (default runs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0
VENV=${DIMGROW_VENV:-.venv-cuda}
OUT=${OUT:-runs/gpu_check}
DATA=${DATA:-../shared/data/criteo/criteo_head8k}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  DIMGROW_DEVICE=cuda DIMGROW_VENV="$VENV" scripts/install.sh
fi
PY="$VENV/bin/python"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "gpu_check: no CUDA device visible" >&2; exit 2; }
mkdir -p "$OUT"
echo "== 1/3 no host sync in the DimGrow step"
"$PY" benchmarks/sync_check.py --device cuda | tee "$OUT/sync_check.txt"
echo "== 2/3 overhead on the GPU"
"$PY" benchmarks/overhead.py --device cuda --dims 4,8,16 --out "$OUT/overhead" | tee "$OUT/overhead.txt"
echo "== 3/3 sharded search (nccl, CUDA FBGEMM)"
RANKS=$(( GPUS >= 2 ? 2 : 1 ))
"$VENV/bin/torchrun" --standalone --nproc_per_node="$RANKS" -m torchrec_dimgrow search \
  --data "$DATA" --format criteo --out "$OUT/search-${RANKS}gpu" --batch-size 64 --epochs 1 --quiet \
  | tee "$OUT/search.txt"
echo "gpu_check: all checks passed on $GPUS GPU(s); results in $OUT"
