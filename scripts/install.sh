#!/usr/bin/env bash
# One install entry point for torchrec-dimgrow.
#   scripts/install.sh            -> .venv with the CPU stack (fbgemm-gpu-cpu)
#   DIMGROW_DEVICE=cuda scripts/install.sh -> the same pins with the CUDA fbgemm-gpu wheel
# torchrec is installed with --no-deps: its metadata names the CUDA `fbgemm-gpu`, which must
# not be pulled onto a CPU machine. Its real runtime deps are pinned in requirements-*.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DIMGROW_VENV:-.venv}
DEVICE=${DIMGROW_DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip==25.3
$PIP install -q -r "requirements-$DEVICE.txt"
$PIP install -q --no-deps torchrec==1.8.0
$PIP install -q -r requirements-dev.txt
$PIP install -q --no-deps -e .
$VENV/bin/python -c "import torchrec, fbgemm_gpu, torchrec_dimgrow; print('torchrec', torchrec.__version__ if hasattr(torchrec,'__version__') else '1.8.0', 'ok')"
