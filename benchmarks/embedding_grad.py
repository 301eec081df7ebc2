"""The embedding gradient: sort-segment vs one-hot GEMM (vs the atomic add.at they replace).

    python benchmarks/embedding_grad.py --backend cupy --out DIR     # on a GPU machine
    python benchmarks/embedding_grad.py --backend numpy               # here (CPU)

For each vocabulary V, token count N = T*B and width dim it times ``scatter_add_rows``
(xlstm/layers.py) with ``method="sort"`` and ``"onehot"`` and, for reference, ``xp.add.at``,
on ids where one id fills a quarter of the positions (a space in character-level text).
Before timing, each method is checked against NumPy's ``np.add.at`` in float64 (1e-12) and
called twice more in float32: ``bitwise_repeatable`` says whether those calls gave the same
bits (add.at on CuPy is expected not to: atomics). Medians of ``--repeat`` calls, the device
synchronised after each. Writes ``embedding_grad.json`` / ``.csv`` under ``--out`` when given.
The "auto" rule in xlstm/layers.py (ONEHOT_MAX_VOCAB, ONEHOT_MAX_ELEMENTS) should follow what
this measures on the GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import numpy as np

if __package__ in (None, ""):                 # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xlstm.backends import resolve  # noqa: E402
from xlstm.errors import XlstmError  # noqa: E402
from xlstm.ops.embedding_scatter import ONEHOT_MAX_ELEMENTS, scatter_add_rows  # noqa: E402

VOCABS = (65, 256, 1024, 8192, 50257)
TOKENS = (2048, 8192)        # T*B: 64x32 and 256x32
DIMS = (64, 256)
METHODS = ("sort", "onehot", "add.at")
COLUMNS = ["backend", "V", "N", "dim", "method", "median_ms", "max_abs_err_f64", "bitwise_repeatable", "note"]


def _ids(rng, V, N):
    ids = rng.integers(0, V, N)
    ids[: N // 4] = min(1, V - 1)
    return rng.permutation(ids)


def _call(be, method, out, ids, rows):
    if method == "add.at":
        be.xp.add.at(out, ids, rows)
    else:
        scatter_add_rows(be.xp, out, ids, rows, method)


def measure(be, V, N, dim, method, repeat, seed=0) -> dict:
    """One row: float64 error against np.add.at, float32 repeatability, float32 median time."""
    xp = be.xp
    row = dict(backend=be.name, V=V, N=N, dim=dim, method=method, median_ms=None, max_abs_err_f64=None,
               bitwise_repeatable=None, note="")
    if method == "onehot" and V * N > 8 * ONEHOT_MAX_ELEMENTS:
        row["note"] = f"skipped: one-hot [{V}x{N}] too large"
        return row
    rng = np.random.default_rng(seed)
    ids_h = _ids(rng, V, N)
    rows_h = rng.standard_normal((N, dim))
    ref = np.zeros((V, dim))
    np.add.at(ref, ids_h, rows_h)
    ids = be.asarray(ids_h)
    out = xp.zeros((V, dim), np.float64)
    _call(be, method, out, ids, be.asarray(rows_h))
    row["max_abs_err_f64"] = float(np.max(np.abs(be.to_numpy(out) - ref)))
    rows = be.asarray(rows_h.astype(np.float32))
    outs = []
    for _ in range(2):
        o = xp.zeros((V, dim), np.float32)
        _call(be, method, o, ids, rows)
        outs.append(be.to_numpy(o, copy=True))
    row["bitwise_repeatable"] = bool(np.array_equal(outs[0], outs[1]))
    out = xp.zeros((V, dim), np.float32)
    times = []
    for _ in range(repeat):
        be.synchronize()
        t0 = time.perf_counter()
        _call(be, method, out, ids, rows)
        be.synchronize()
        times.append(time.perf_counter() - t0)
    row["median_ms"] = statistics.median(times) * 1e3
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="auto", help="numpy, cupy or auto")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--vocab", default=",".join(map(str, VOCABS)))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--dims", default=",".join(map(str, DIMS)))
    p.add_argument("--out", default=None, help="folder for embedding_grad.json / .csv")
    a = p.parse_args(argv)
    try:
        be = resolve(a.backend)
    except XlstmError as e:
        print(f"embedding_grad: {e}", file=sys.stderr)
        return 2
    rows = []
    print(f"{'V':>6} {'N':>5} {'dim':>4} | " + " | ".join(f"{m:>16}" for m in METHODS)
          + "   (median ms, repeatable?)")
    for V in map(int, a.vocab.split(",")):
        for N in map(int, a.tokens.split(",")):
            for dim in map(int, a.dims.split(",")):
                got = [measure(be, V, N, dim, m, a.repeat) for m in METHODS]
                rows += got
                cells = []
                for r in got:
                    if r["median_ms"] is None:
                        cells.append(f"{'-':>16}")
                    else:
                        ok = "" if r["max_abs_err_f64"] <= 1e-12 * N else " WRONG"
                        cells.append(f"{r['median_ms']:>9.3f} {'same' if r['bitwise_repeatable'] else 'DIFF':>4}{ok}")
                print(f"{V:>6} {N:>5} {dim:>4} | " + " | ".join(cells), flush=True)
    bad = [r for r in rows if r["method"] != "add.at" and r["median_ms"] is not None
           and (r["max_abs_err_f64"] > 1e-12 * r["N"] or not r["bitwise_repeatable"])]
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "embedding_grad.json"), "w") as f:
            json.dump({"backend": be.name, "argv": sys.argv, "rows": rows}, f, indent=1)
        with open(os.path.join(a.out, "embedding_grad.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    if bad:
        print(f"FAILED: {len(bad)} rows wrong or not repeatable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
