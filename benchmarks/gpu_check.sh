#!/usr/bin/env bash
# The GPU check, in one script a GPU machine runs in under 8 minutes:
#   1. the tests that need a device:  python -m pytest -m gpu tests -q
#   2. the benchmark matrix NumPy vs CuPy vs torch (cuDNN), B=32 and B=64, checked before timing
# Everything goes under OUT_DIR: machine.txt, pytest_gpu.txt, bench.txt (the table), bench.err,
# gpu.json / gpu.csv / gpu.png, and summary.txt (exit codes and the two targets' ratios).
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Works on a bare machine with cupy, torch and nvcc but without this package installed: it runs
# from the source tree with PYTHONPATH (no pip install, no network). PYTHON picks the interpreter.
. "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" "$@"     # OUT, ROOT, PY, START; cd "$ROOT"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
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
from xlstm.backends import cupy_unavailable_reason
print("xlstm cupy backend:", cupy_unavailable_reason() or "usable")
PYEOF
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

echo "== pytest -m gpu tests (limit 180 s)"
timeout 180 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider > "$OUT/pytest_gpu.txt" 2>&1
PYTEST_RC=$?
tail -5 "$OUT/pytest_gpu.txt"

# What is left of the 8 minutes, less a margin, goes to the benchmark (at most 300 s).
LEFT=$(( 450 - ($(date +%s) - START) ))
BUDGET=$(( LEFT < 300 ? LEFT : 300 ))
[ "$BUDGET" -lt 60 ] && BUDGET=60
echo "== xlstm bench numpy vs cupy vs torch, B=32,64 (budget ${BUDGET} s)"
timeout $(( BUDGET + 60 )) "$PY" -m xlstm.cli bench --backends numpy,cupy \
    --hidden 64,256,512,1024,2048 --seq-len 16,64,256 --batch 32,64 --layers 1 \
    --budget "$BUDGET" --max-cell-seconds 45 --target-seconds 0.3 --no-progress \
    --out "$OUT" --name gpu > "$OUT/bench.txt" 2> "$OUT/bench.err"
BENCH_RC=$?
cat "$OUT/bench.txt"

"$PY" - "$OUT/gpu.json" > "$OUT/summary.txt" 2>&1 <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ok = {(r["backend"], r["H"], r["T"], r["B"], r["layers"]): r for r in rows if r["status"] == "ok"}
print("target: CuPy step <= 1.0x cuDNN for H >= 512, B >= 64")
for (be, H, T, B, L), r in sorted(ok.items()):
    if be == "cupy" and H >= 512 and B >= 64:
        v = r["step_over_torch"]
        print(f"  H={H} T={T} B={B} L={L}: cupy/cuDNN = {v:.2f}x" if v else f"  H={H} T={T} B={B}: no torch")
r = ok.get(("cupy", 1024, 256, 32, 1))
print("target: CuPy >= 50x NumPy at H=1024, T=256 (B=32):",
      f"{r['speedup_vs_numpy']:.1f}x" if r and r.get("speedup_vs_numpy") else "not measured (skipped)")
PYEOF
{
  echo "pytest -m gpu exit code: $PYTEST_RC"
  echo "bench exit code: $BENCH_RC"
  echo "elapsed: $(( $(date +%s) - START )) s"
} >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
