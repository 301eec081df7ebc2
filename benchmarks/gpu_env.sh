# Sourced by the GPU scripts (gpu_check.sh, gpu_precision.sh) with their arguments: checks the
# OUT_DIR argument, makes it absolute, runs from the source tree (PYTHONPATH, no install) and
# sets PY (the interpreter: $PYTHON or python3) and START (for the elapsed time).
set -u
OUT=${1:?usage: bash $0 OUT_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
START=$(date +%s)
