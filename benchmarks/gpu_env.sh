# Sourced by the GPU scripts (gpu_check.sh, gpu_precision.sh) with their arguments: takes OUT_DIR
# from the first argument (else $DEFAULT_OUT under the source tree, where the script sets one),
# makes it absolute, runs from the source tree (PYTHONPATH, no install) and sets PY (the
# interpreter: $PYTHON or python3) and START (for the elapsed time).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${DEFAULT_OUT:+$ROOT/$DEFAULT_OUT}}
if [ -z "$OUT" ]; then
  echo "usage: bash $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
START=$(date +%s)
