#!/usr/bin/env bash
# The GPU check of the precision modes (issue 12), in one script of about 8 minutes:
#   1. the device tests of tests/test_precision.py (cuBLAS tf32/bf16 within the CPU-derived bounds,
#      captured-graph replay equal to the eager loop (tests/test_cuda_graphs.py -k precision),
#      bf16 equal to the NumPy emulation, which TF32 rounding cuBLAS applies)
#   2. xlstm bench on the cupy backend over the issue's grid (H 512,1024,2048; T 64,256; B 64,256;
#      one layer) in float32, tf32 and bf16, torch beside it in the same mode (TF32 off / on,
#      autocast(bfloat16)), results checked before timing
# Under OUT_DIR: pytest_precision.txt, bench-{float32,tf32,bf16}.{txt,json,csv}, summary.txt.
# NOT YET RUN: written without a GPU.
#
#   bash benchmarks/gpu_precision.sh OUT_DIR
. "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh" "$@"     # OUT, ROOT, PY, START; cd "$ROOT"

echo "== pytest -m gpu tests/test_precision.py, test_cuda_graphs.py -k precision (limit 120 s)"
timeout 120 "$PY" -m pytest -m gpu tests/test_precision.py tests/test_cuda_graphs.py -k precision -q -s -p no:cacheprovider > "$OUT/pytest_precision.txt" 2>&1
PYTEST_RC=$?
grep -E "TF32 operand rounding|passed|failed" "$OUT/pytest_precision.txt"

RC=0
for MODE in float32 tf32 bf16; do
  echo "== xlstm bench cupy --precision $MODE (budget 100 s)"
  timeout 160 "$PY" -m xlstm.cli bench --backends cupy --precision "$MODE" \
      --hidden 512,1024,2048 --seq-len 64,256 --batch 64,256 --layers 1 \
      --budget 100 --max-cell-seconds 20 --target-seconds 0.2 --no-progress --no-plot \
      --out "$OUT" --name "bench-$MODE" > "$OUT/bench-$MODE.txt" 2> "$OUT/bench-$MODE.err"
  R=$?; [ "$R" -ne 0 ] && RC=$R
  cat "$OUT/bench-$MODE.txt"
done

"$PY" - "$OUT" > "$OUT/summary.txt" 2>&1 <<'PYEOF'
import json, os, sys
out = sys.argv[1]
rows = {}
for mode in ("float32", "tf32", "bf16"):
    p = os.path.join(out, f"bench-{mode}.json")
    if os.path.exists(p):
        for r in json.load(open(p))["rows"]:
            if r["status"] == "ok":
                rows[(mode, r["H"], r["T"], r["B"])] = r
for mode, what in (("bf16", "torch.autocast(bfloat16) cuDNN"), ("tf32", "cuDNN TF32")):
    print(f"target: {mode} step <= 1.0x {what}")
    for (m, H, T, B), r in sorted(rows.items()):
        if m == mode:
            v = r.get("step_over_torch")
            print(f"  H={H} T={T} B={B}: {r['step_ms']:.2f} ms, x{v:.2f} of torch" if v else f"  H={H} T={T} B={B}: no torch")
print("target: bf16 >= 4x faster than float32 at H=2048")
for (m, H, T, B), r in sorted(rows.items()):
    f = rows.get(("float32", H, T, B))
    if m == "bf16" and H == 2048 and f:
        print(f"  T={T} B={B}: float32 {f['step_ms']:.2f} ms / bf16 {r['step_ms']:.2f} ms = {f['step_ms'] / r['step_ms']:.2f}x")
PYEOF
{
  echo "pytest exit code: $PYTEST_RC"
  echo "bench exit code (last failing): $RC"
  echo "elapsed: $(( $(date +%s) - START )) s"
} >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
[ "$PYTEST_RC" -eq 0 ] && [ "$RC" -eq 0 ]
