#!/usr/bin/env bash
# The whole GPU check of issues 9-12 in ONE command for one device call (about 9 minutes):
#
#   bash benchmarks/gpu_session.sh [OUT_DIR [PART ...]]     # default OUT_DIR benchmarks/results/gpu-h200
#
# Parts, in this order (priority order: a global time budget cuts the last ones first):
#   machine           machine.txt (GPU, driver, versions), nvmath.txt (is nvmath-python usable?)
#   tests             pytest -m gpu, one process per test file, persistent-kernel tests left out;
#                     per file: pytest-<file>.txt, a line in tests.jsonl (rc, counts, seconds)
#   tests-persistent  pytest -m gpu -k persistent in a process of its own, AFTER the others: a
#                     persistent kernel's trap ends the process's CUDA context
#   bench             issue 9/10: CuPy (graphs on) vs cuDNN, TF32 off, H 64..2048, T 64/256,
#                     B 32/64 -> gpu.json; B=256 rows for the GEMM-floor target -> b256.json;
#                     CuPy graphs off at a few cells (eager vs replay) -> graphs-off.json; the
#                     LayerNorm cell, H 256/1024, T 64/256, B=64 -> ln.json; NumPy
#                     next to CuPy in one run, H 64..1024, T 64/256, B=32, NumPy cells over 20 s
#                     skipped and listed -> numpy.json
#   persistent        issue 11: --persistent off / on, each next to cuDNN, H 64..1024, T 64/256,
#                     B 16/64 -> persistent-off.json, persistent-on.json
#   precision         issue 12: tf32 and bf16 next to cuDNN TF32 / autocast(bf16), H 512..2048,
#                     T 64/256, B 64/256 -> precision-tf32.json, precision-bf16.json (float32:
#                     the bench part's rows); needs nvmath-python
#   train             `xlstm train --backend cupy`, the default run, short (150 steps), float32
#                     and bf16 -> train-<mode>.json (steps/s, val loss), train-<mode>-metrics.jsonl
#   embedding         the embedding-gradient micro-benchmark (issue 9) -> embedding_grad.json
#   report            README.md by benchmarks/gpu_readme.py: command, machine, tables, the
#                     targets of issues 9-12 as MET / NOT MET / NOT MEASURED
# Every part writes its files as it finishes (the bench after every cell), so a time limit
# keeps what was done; session.jsonl says per part: done / failed / timeout / skipped, why.
#
# Time: XLSTM_SESSION_SECONDS (default 530) for everything; each part gets at most its own cap
# and never more than what is left (less a reserve for the report); a part that would get
# less than it needs is skipped and said so. Rerun one part: bash benchmarks/gpu_session.sh OUT
# precision report (same OUT: the report reads every part's files).
# Other knobs: XLSTM_SESSION_FILE_SECONDS (default 100) caps one test file's process (one test:
# 60 s, only where pytest-timeout is installed); XLSTM_SESSION_TRAIN_STEPS (default 150) the
# train part's steps; XLSTM_GPU_TEST_FILES the test files of the tests part (default: every
# tests/test_*.py that has a gpu mark).
#
# nvmath-python (CUDA-graph replay, tf32/bf16 GEMMs): used when importable; else installed from
# a carried wheel .whl/nvmath_python-*.whl (see benchmarks/results/README.md) into
# /tmp/xlstm-site; else the parts run without it and the report says that graph replay and
# the tf32/bf16 rows were NOT MEASURED.
#
# Runs from the source tree (PYTHONPATH, no install, no network). PYTHON picks the interpreter.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/benchmarks/results/gpu-h200}
shift || true
PARTS=${*:-machine tests tests-persistent bench persistent precision train embedding report}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)
TOTAL=${XLSTM_SESSION_SECONDS:-530}
RESERVE=10                      # kept for the report
TRAIN_STEPS=${XLSTM_SESSION_TRAIN_STEPS:-150}

elapsed() { echo $(( $(date +%s) - START )); }

# grant CAP MIN: seconds this part may use (at most CAP, at most what is left less the
# reserve); prints 0 when that is under MIN
grant() {
  local left=$(( TOTAL - $(elapsed) - RESERVE ))
  local g=$(( $1 < left ? $1 : left ))
  [ "$g" -lt "$2" ] && g=0
  echo "$g"
}

# record PART STATUS RC SECONDS BUDGET NOTE: one JSON line in session.jsonl
record() {
  "$PY" - "$OUT/session.jsonl" "$@" <<'PYEOF'
import json, sys
path, part, status, rc, secs, budget, note = sys.argv[1:8]
with open(path, "a") as f:
    f.write(json.dumps({"part": part, "status": status, "rc": int(rc), "seconds": int(secs),
                        "budget": int(budget), "note": note}) + "\n")
PYEOF
  echo "== $1: $2 (rc $3, $4 s of $5 s${6:+; $6})"
}

# run_part PART CAP MIN CMD...: CMD under `timeout` with the granted seconds; records the outcome
run_part() {
  local part=$1 cap=$2 min=$3; shift 3
  local g; g=$(grant "$cap" "$min")
  if [ "$g" -eq 0 ]; then
    record "$part" skipped 0 0 0 "not run: under ${min} s of the session's ${TOTAL} s left (NOT MEASURED)"
    return 0
  fi
  local t0; t0=$(date +%s)
  echo "== $part (up to $g s; session at $(elapsed) s of $TOTAL)"
  rm -f "$OUT/.part-note"
  # a part is a function of this script run in a child bash (exported below), so that
  # `timeout` can end it and everything it started
  PART_SECONDS=$g timeout -k 5 "$g" bash -c "$1"
  local rc=$? secs=$(( $(date +%s) - t0 ))
  local status=done
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout
  elif [ "$rc" -ne 0 ]; then status=failed; fi
  record "$part" "$status" "$rc" "$secs" "$g" "$(cat "$OUT/.part-note" 2>/dev/null)"
  rm -f "$OUT/.part-note"
}

# note TEXT: said in session.jsonl next to the part that is running
note() { echo "$*" >> "$OUT/.part-note"; }

# bench NAME BUDGET_SLACK ARGS...: xlstm bench with --budget = the part's grant less slack
bench() {
  local name=$1 slack=$2; shift 2
  local b=$(( PART_SECONDS - slack ))
  if [ "$b" -lt 10 ]; then
    note "$name: not run, ${PART_SECONDS} s left of the part (NOT MEASURED)"
    return 1
  fi
  "$PY" -m xlstm.app.cli bench --budget "$b" --no-progress --out "$OUT" --name "$name" "$@" \
      > "$OUT/$name.txt" 2> "$OUT/$name.err"
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  [ "$rc" -ne 0 ] && note "$name: rc $rc: $(grep -v '^\[' "$OUT/$name.err" | tail -n 1 | cut -c1-300)"
  return $rc
}

part_machine() {
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1 || true
    nvcc --version 2>&1 | tail -2 || true
    lscpu 2>/dev/null | grep -E '^(Model name|CPU\(s\)):' || true
    "$PY" - <<'PYEOF' 2>&1
import numpy, sys
print("python", sys.version.split()[0], "numpy", numpy.__version__)
try:
    import cupy
    print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as e:
    print("cupy: not usable:", e)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "available", torch.cuda.is_available())
except Exception as e:
    print("torch: not usable:", e)
try:
    from threadpoolctl import threadpool_info
    print("blas", [(d.get("internal_api"), d.get("version"), d.get("num_threads")) for d in threadpool_info()])
except Exception:
    pass
from importlib import metadata
for d in ("nvmath-python", "cuda-bindings", "cuda-core", "cuda-pathfinder", "cupy-cuda13x", "cupy-cuda12x"):
    try:
        print(d, metadata.version(d))
    except metadata.PackageNotFoundError:
        pass
from xlstm.backends import cupy_unavailable_reason
print("xlstm cupy backend:", cupy_unavailable_reason() or "usable")
PYEOF
    echo "nvmath-python: $(cat "$OUT/nvmath.txt")"
  } > "$OUT/machine.txt" 2>&1
  cat "$OUT/machine.txt"
}

# nvmath-python: importable, or from a carried wheel, or said missing (nvmath.txt, NVMATH=0/1)
nvmath_check() {
  "$PY" -c "import nvmath, nvmath.bindings.cublas as c; c.create; print('usable', nvmath.__version__)" \
      > "$OUT/nvmath.txt" 2>/dev/null && return 0
  local whl; whl=$(ls "$ROOT"/.whl/nvmath_python-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/xlstm-site "$whl" > "$OUT/nvmath_install.txt" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/xlstm-site"
    "$PY" -c "import nvmath, nvmath.bindings.cublas as c; c.create; print('usable', nvmath.__version__, '(from $(basename "$whl"))')" \
        > "$OUT/nvmath.txt" 2>>"$OUT/nvmath_install.txt" && return 0
  fi
  local why; why=$("$PY" -c "import nvmath.bindings.cublas" 2>&1 | tail -n 1 | cut -c1-200)
  echo "missing: nvmath-python is not usable ($why)$([ -n "$whl" ] && echo "; the carried wheel: nvmath_install.txt"); CUDA-graph replay and the tf32/bf16 rows are NOT MEASURED (the cupy backend runs its eager loop)" > "$OUT/nvmath.txt"
  return 1
}

# the files that hold gpu tests
GPU_TEST_FILES=${XLSTM_GPU_TEST_FILES:-$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')}
TIMEOUT_OPT=""
FILE_CAP=${XLSTM_SESSION_FILE_SECONDS:-100}
"$PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPT="--timeout=60"     # one hung test

# pytest_group GROUP KEXPR FILE...: one pytest process per file (or one for all with GROUP
# persistent), each under what is left of the part's grant
pytest_group() {
  local group=$1 kexpr=$2; shift 2
  local end=$(( $(date +%s) + PART_SECONDS - 3 )) rc=0
  # a rerun of the group replaces its earlier lines
  if [ -f "$OUT/tests.jsonl" ]; then
    grep -v "\"group\": \"$group\"" "$OUT/tests.jsonl" > "$OUT/tests.jsonl.tmp"
    mv "$OUT/tests.jsonl.tmp" "$OUT/tests.jsonl"
  fi
  for f in "$@"; do
    local name left t0 r secs
    name=$([ "$group" = persistent ] && echo persistent || basename "$f" .py)
    left=$(( end - $(date +%s) ))
    [ "$left" -gt "$FILE_CAP" ] && left=$FILE_CAP     # a hanging file leaves time to the others
    if [ "$left" -lt 5 ]; then
      "$PY" "$ROOT/benchmarks/gpu_readme.py" --test-line "$OUT/tests.jsonl" "$group" "$name" 0 0 1 \
          "not run: the part's time was used up (NOT MEASURED)"
      rc=1; continue
    fi
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout -k 5 "$left" "$PY" -m pytest -m gpu -q -p no:cacheprovider $TIMEOUT_OPT -k "$kexpr" \
        $([ "$group" = persistent ] && echo "$@" || echo "$f") > "$OUT/pytest-$name.txt" 2>&1
    r=$?; secs=$(( $(date +%s) - t0 ))
    [ "$r" -eq 5 ] && r=0                 # no test selected in this file
    "$PY" "$ROOT/benchmarks/gpu_readme.py" --test-line "$OUT/tests.jsonl" "$group" "$name" "$r" "$secs" \
        "$([ "$r" -eq 124 ] || [ "$r" -eq 137 ] && echo 1 || echo 0)" "$OUT/pytest-$name.txt"
    [ "$r" -ne 0 ] && rc=1
    [ "$group" = persistent ] && break
  done
  return $rc
}

# the main group keeps the persistent kernels off (they are the risky group), whatever the default
part_tests() { XLSTM_PERSISTENT=off pytest_group main "not persistent" $GPU_TEST_FILES; }
part_tests_persistent() { pytest_group persistent "persistent" $GPU_TEST_FILES; }

# sub SHARE_CAP: seconds for the next bench of a part: at most SHARE_CAP, at most what is left
# of the part's grant (PART_START, PART_SECONDS)
sub() {
  local left=$(( PART_SECONDS - ($(date +%s) - PART_START) ))
  echo $(( $1 < left ? $1 : left ))
}

part_bench() {
  local rc=0
  export PART_START; PART_START=$(date +%s)
  # (a) CuPy (graphs on) vs cuDNN over the grid of record, first: GPU cells take seconds
  # (persistent kernels off in this part: its rows are the per-step loop, graph-replayed)
  PART_SECONDS=$(sub 75) bench gpu 12 --backends cupy --persistent off \
      --hidden 64,256,1024,2048 --seq-len 64,256 --batch 32,64 --layers 1 \
      --target-seconds 0.2 --rounds 3 --settle 0.02 || rc=1
  # B=256: both sides GEMM-bound (issue 10's floor target)
  PART_SECONDS=$(sub 35) bench b256 10 --backends cupy --persistent off --hidden 256,1024,2048 --seq-len 64,256 \
      --batch 256 --layers 1 --target-seconds 0.2 --rounds 3 --settle 0.02 || rc=1
  # graphs off at a few cells: eager vs replayed
  PART_SECONDS=$(sub 25) bench graphs-off 10 --backends cupy --persistent off --cuda-graphs off --hidden 64,256,1024 \
      --seq-len 64,256 --batch 64 --layers 1 --target-seconds 0.15 --rounds 3 --settle 0.02 --no-plot || rc=1
  # the LayerNorm cell at issue 10's sizes (its target: at most 1.5x the plain cell's step above)
  PART_SECONDS=$(sub 25) bench ln 10 --backends cupy --persistent off --layer-norm --hidden 256,1024 \
      --seq-len 64,256 --batch 64 --layers 1 --target-seconds 0.15 --rounds 3 --settle 0.02 --no-plot || rc=1
  # NumPy next to CuPy in one run (the CuPy/NumPy ratio, and CuPy checked against NumPy): only
  # the cells NumPy finishes in 20 s; the others are skipped and listed
  PART_SECONDS=$(sub 60) bench numpy 10 --backends numpy,cupy --persistent off --hidden 64,256,1024 --seq-len 64,256 \
      --batch 32 --layers 1 --max-cell-seconds 20 --target-seconds 0.2 --rounds 2 --settle 0.05 --no-plot || rc=1
  return $rc
}

part_persistent() {
  local rc=0 half=$(( PART_SECONDS / 2 ))
  for mode in off on; do
    PART_SECONDS=$half bench "persistent-$mode" 12 --backends cupy --persistent "$mode" \
        --hidden 64,256,512,1024 --seq-len 64,256 --batch 16,64 --layers 1 --repeat 15 \
        --target-seconds 0.15 --rounds 3 --settle 0.02 --no-plot || rc=1
  done
  return $rc
}

part_precision() {
  local rc=0 half=$(( PART_SECONDS / 2 ))
  for mode in tf32 bf16; do
    PART_SECONDS=$half bench "precision-$mode" 12 --backends cupy --precision "$mode" \
        --hidden 512,1024,2048 --seq-len 64,256 --batch 64,256 --layers 1 --max-cell-seconds 20 \
        --target-seconds 0.15 --rounds 3 --settle 0.02 --no-plot || rc=1
  done
  return $rc
}

part_train() {
  local rc=0 modes="float32 bf16"
  [ "$NVMATH" -eq 0 ] && modes=float32
  for mode in $modes; do
    rm -rf "/tmp/xlstm-train-$mode"
    "$PY" -m xlstm.app.cli train --backend cupy --precision "$mode" --steps "$TRAIN_STEPS" \
        --eval-every "$TRAIN_STEPS" --save-every 1000000 --log-every 10 --no-progress \
        --out "/tmp/xlstm-train-$mode" > "$OUT/train-$mode.txt" 2>&1
    local r=$?
    [ "$r" -ne 0 ] && note "train $mode: rc $r: $(tail -n 1 "$OUT/train-$mode.txt" | cut -c1-300)"
    cp "/tmp/xlstm-train-$mode/metrics.jsonl" "$OUT/train-$mode-metrics.jsonl" 2>/dev/null
    "$PY" "$ROOT/benchmarks/gpu_readme.py" --train-summary "$OUT" "$mode" "$r" "$TRAIN_STEPS" || r=1
    [ "$r" -ne 0 ] && rc=1
  done
  [ "$NVMATH" -eq 0 ] && note "bf16 NOT MEASURED (nvmath-python missing)"
  return $rc
}

part_embedding() {
  "$PY" benchmarks/embedding_grad.py --backend cupy --repeat 20 --vocab 65,256,1024,50257 \
      --tokens 2048,8192 --dims 64,256 --out "$OUT" > "$OUT/embedding_grad.txt" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && note "rc $rc: $(tail -n 1 "$OUT/embedding_grad.txt" | cut -c1-300)"
  return $rc
}

part_report() { "$PY" benchmarks/gpu_readme.py "$OUT"; }

# a session with the machine part is a new one: the parts' records start empty (a rerun of
# single parts into the same folder appends)
case " $PARTS " in *" machine "*) rm -f "$OUT/session.jsonl" "$OUT/tests.jsonl" ;; esac
NVMATH=0
nvmath_check && NVMATH=1
export ROOT OUT PY NVMATH TRAIN_STEPS GPU_TEST_FILES TIMEOUT_OPT FILE_CAP PYTHONPATH
export -f note bench sub pytest_group part_machine part_tests part_tests_persistent part_bench \
    part_persistent part_precision part_train part_embedding part_report
echo "nvmath-python: $(cat "$OUT/nvmath.txt")"
for part in $PARTS; do
  case $part in
    machine)          run_part machine 30 5 part_machine ;;
    tests)            run_part tests 150 20 part_tests ;;
    tests-persistent) run_part tests-persistent 45 15 part_tests_persistent ;;
    bench)            run_part bench 215 60 part_bench ;;
    persistent)       run_part persistent 80 30 part_persistent ;;
    precision)        if [ "$NVMATH" -eq 1 ]; then run_part precision 80 30 part_precision
                      else record precision skipped 0 0 0 "NOT MEASURED: $(cat "$OUT/nvmath.txt")"; fi ;;
    train)            run_part train 60 20 part_train ;;
    embedding)        run_part embedding 45 20 part_embedding ;;
    report)           RESERVE=0 run_part report 30 1 part_report ;;
    *) echo "unknown part $part (machine tests tests-persistent bench persistent precision train embedding report)" >&2
       exit 2 ;;
  esac
done
echo "== session: $(elapsed) s; files under $OUT"
[ -f "$OUT/targets.txt" ] && cat "$OUT/targets.txt"
# exit 0 only when every part that ran finished cleanly
! grep -q '"status": "\(failed\|timeout\)"' "$OUT/session.jsonl" 2>/dev/null
