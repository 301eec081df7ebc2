#!/usr/bin/env bash
# The persistent kernels' GPU check (issue 11), one script for a GPU session:
#   1. the persistent gpu tests: python -m pytest -m gpu tests/test_cupy_backend.py -k persistent
#   2. the issue's grid, per-step (off) vs persistent (on) in separate runs, each next to cuDNN:
#      H 64,256,512,1024 x T 64,256 x B 16,64, one layer, float32 (the bench turns TF32 off)
# Everything goes under OUT_DIR: pytest.txt, bench-{off,on}.txt/.err, persistent-{off,on}.json/.csv,
# and summary.txt (exit codes). Copy the result files to benchmarks/results/gpu-h200/ and replace
# the UNMEASURED crossover table in xlstm/backends/persistent.py with what they show.
#
#   bash benchmarks/persistent_check.sh OUT_DIR [extra xlstm bench options]
set -u
OUT=${1:?usage: bash benchmarks/persistent_check.sh OUT_DIR [bench options]}
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

timeout 300 "$PY" -m pytest -m gpu -q tests/test_cupy_backend.py -k persistent >"$OUT/pytest.txt" 2>&1
echo "pytest rc=$?" >"$OUT/summary.txt"
for mode in off on; do
  timeout 400 "$PY" -m xlstm bench --backends cupy --hidden 64,256,512,1024 --seq-len 64,256 \
    --batch 16,64 --layers 1 --dtype float32 --persistent "$mode" --repeat 15 --budget 300 \
    --out "$OUT" --name "persistent-$mode" --no-plot --no-progress "$@" \
    >"$OUT/bench-$mode.txt" 2>"$OUT/bench-$mode.err"
  echo "bench persistent=$mode rc=$?" >>"$OUT/summary.txt"
done
cat "$OUT/summary.txt"
