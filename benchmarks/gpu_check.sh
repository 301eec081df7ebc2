#!/usr/bin/env bash
# The GPU check of issue 9, in one script that a GPU machine runs in about 7 minutes (a 15-minute
# lease leaves room for a cold start and one rerun of a part):
#   1. the tests that need a device: python -m pytest -m gpu tests -q (limit 180 s), among them
#      bitwise-repeatable training and Ctrl-C + --resume equal to the uninterrupted run;
#   2. the bench, NumPy vs CuPy vs torch (cuDNN on the GPU, TF32 off), checked before timing
#      (CuPy against NumPy as well): H in {64,256,1024,2048}, T in {64,256}, B in {32,64}, 1 layer,
#      float32; cells estimated over 30 s (the largest NumPy ones) are skipped and listed;
#   3. the embedding-gradient micro-benchmark (sort-segment vs one-hot GEMM vs atomic add.at);
#   4. README.md of the folder, by benchmarks/gpu_readme.py (the table, the machine, the command).
# Everything goes under OUT_DIR (default benchmarks/results/gpu-h200): machine.txt,
# pytest_gpu.txt, bench.txt (the table), bench.err, gpu.json / gpu.csv / gpu.png,
# embedding_grad.json / .csv / .txt, summary.txt (exit codes, the targets' ratios), README.md.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Works on a bare machine with cupy, torch and nvcc but without this package installed: it runs
# from the source tree with PYTHONPATH (no pip install, no network). PYTHON picks the interpreter.
DEFAULT_OUT=benchmarks/results/gpu-h200
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

# What is left of 7 minutes, less the micro-benchmark's minute, goes to the bench (at most 300 s).
LEFT=$(( 360 - ($(date +%s) - START) ))
BUDGET=$(( LEFT < 300 ? LEFT : 300 ))
[ "$BUDGET" -lt 90 ] && BUDGET=90
echo "== xlstm bench numpy vs cupy vs torch, H 64..2048, T 64,256, B 32,64 (budget ${BUDGET} s)"
timeout $(( BUDGET + 60 )) "$PY" -m xlstm.cli bench --backends numpy,cupy \
    --hidden 64,256,1024,2048 --seq-len 64,256 --batch 32,64 --layers 1 \
    --budget "$BUDGET" --max-cell-seconds 30 --target-seconds 0.3 --rounds 3 --no-progress \
    --out "$OUT" --name gpu > "$OUT/bench.txt" 2> "$OUT/bench.err"
BENCH_RC=$?
cat "$OUT/bench.txt"

echo "== embedding gradient: sort vs one-hot vs add.at (limit 60 s)"
timeout 60 "$PY" benchmarks/embedding_grad.py --backend cupy --repeat 20 --vocab 65,256,1024,50257 \
    --tokens 2048,8192 --dims 64,256 --out "$OUT" > "$OUT/embedding_grad.txt" 2>&1
EMB_RC=$?
cat "$OUT/embedding_grad.txt"

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
  echo "embedding_grad exit code: $EMB_RC"
  echo "elapsed: $(( $(date +%s) - START )) s"
} >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
"$PY" benchmarks/gpu_readme.py "$OUT" || true
[ "$PYTEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$EMB_RC" -eq 0 ]
