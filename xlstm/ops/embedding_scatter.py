"""The embedding's gradient: a scatter-add of rows by id, deterministic on every backend.

    dE[v] += sum_n [ids[n] == v] dy[n]

``xp.add.at`` would do it, but CuPy implements it with atomicAdd, so the order of the float
additions (and the last bits of dE) changes from run to run, and so does every later step of a
training run. Both methods of ``scatter_add_rows`` add in an order fixed by the data alone and
are written once against the array module ``xp`` (NumPy and CuPy alike; no kernel of its own).
Reference: ``np.add.at`` (tests/ops/test_op_optim_loss.py).
"""
from __future__ import annotations

from ..errors import InputError
from .spec import Arg, OpSpec

SCATTER = OpSpec(
    "scatter_add_rows",
    args=(Arg("out", ("V", "dim"), "acc"), Arg("ids", ("N",), dtype="int64"), Arg("rows", ("N", "dim"))),
    summary="out[ids[n]] += rows[n], repeated ids summed in a fixed order")

SPECS = (SCATTER,)

SCATTER_METHODS = ("auto", "sort", "onehot")
ONEHOT_MAX_VOCAB = 256           # "auto": one-hot GEMM up to this vocabulary ...
ONEHOT_MAX_ELEMENTS = 1 << 24    # ... and while the [V, N] one-hot matrix stays this small


def scatter_add_rows(xp, out, ids, rows, method: str = "auto") -> None:
    """out[ids[n]] += rows[n] for every n, repeated ids summed, in a fixed order.

    out [V, dim]; ids [N] integers in [0, V); rows [N, dim] (out's dtype).
    method "onehot": out += onehot(ids)^T @ rows, onehot [N, V] (one GEMM; rows of zeros
    and ones, so each sum is dy's rows in the GEMM's order; a non-finite dy row turns the
    whole of out non-finite, as 0 * inf = nan).
    method "sort": a stable argsort groups equal ids into segments, an inclusive segmented
    scan (Hillis-Steele: pass d adds the row d places back when it has the same id; log2 of
    the longest segment passes) leaves each segment's sum on its last row, and those rows
    go to their ids, which are now distinct. Memory O(N * dim) whatever V.
    "auto": onehot for V <= ONEHOT_MAX_VOCAB with V * N <= ONEHOT_MAX_ELEMENTS, else sort.
    ``benchmarks/embedding_grad.py`` measures both; on a shared 2-core CPU (N 2048-8192, dim
    64-256) onehot was faster in most cells up to V = 256 (up to 8x at V = 65) and slower
    from V = 512. On a GPU onehot is one GEMM with no host sync, sort syncs twice.
    """
    if method not in SCATTER_METHODS:
        raise InputError(f"method must be one of {SCATTER_METHODS}, got {method!r}")
    N, V = ids.shape[0], out.shape[0]
    if N == 0:
        return
    if method == "auto":
        method = "onehot" if V <= ONEHOT_MAX_VOCAB and V * N <= ONEHOT_MAX_ELEMENTS else "sort"
    if method == "onehot":
        # arange in its default int64: in the ids' dtype (uint8, say) it would wrap past 255
        onehot = (ids[:, None] == xp.arange(V)[None, :]).astype(out.dtype)
        out += onehot.T @ rows
        return
    order = xp.argsort(ids, kind="stable")
    keys = ids[order]
    acc = rows[order]                                   # a copy: the scan writes into it
    last = xp.ones(N, dtype=bool)                       # the last row of each segment
    last[:-1] = keys[1:] != keys[:-1]
    ends = xp.nonzero(last)[0]
    longest = int((ends - xp.concatenate([xp.full(1, -1, ends.dtype), ends[:-1]])).max())
    d = 1
    while d < longest:
        same = (keys[d:] == keys[:-d])[:, None]
        acc[d:] += xp.where(same, acc[:-d], 0)          # right side first: a new array
        d *= 2
    out[keys[ends]] += acc[ends]                        # distinct ids: no repeated index
