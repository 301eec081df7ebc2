"""``xlstm bench``: time the LSTM against its GEMM floor and PyTorch, per backend.

    xlstm bench                 # the full matrix: H 64..2048, T 16/64/256, 1 and 2 layers
    xlstm bench --quick         # a small subset in well under a minute
    python -m benchmarks ...    # the same command from a source checkout

For every cell (hidden size H, sequence length T, batch B, layers L; input size = H) and
every backend that can run here it measures, in one process and interleaved round by round
so that load from elsewhere hits every contender alike:

- ``fwd``: ``lstm.forward(x)``; ``step``: forward + ``lstm.backward(dy)`` (a training step
  without the optimizer), medians after warm-up, the GPU synchronised after each call;
- ``floor``: the same GEMMs that the layer calls (input GEMM [T*B,D]x[D,4H], T recurrent
  [B,H]x[H,4H], T backward [B,4H]x[4H,H], then dW, dU, dx), with the same operand layouts,
  alone: what no LSTM on this BLAS can beat, so ``step/floor`` is the cost of the rest; on
  CuPy timed as the step runs them (the same cuBLAS path, per-step loops replayed as CUDA
  graphs when the step's are: ``floor_captured``);
- ``host_fwd_us`` / ``host_bwd_us`` (CuPy): host time of one forward / backward call per time
  step and layer, the device idle before the call and not waited for after it;
- ``torch``: ``torch.nn.LSTM`` with the same weights on the same device (CPU; cuDNN on a
  GPU) when torch is installed, so ``step/torch`` says where we stand;
- peak memory: for NumPy the process's peak host RSS during one step (VmHWM, reset before
  the step) and the peak of NumPy's own allocations in the step (tracemalloc); for CuPy the
  memory pool's peak above its level before the step (torch: max_memory_allocated likewise).

Before any timing each cell is checked: the layer's outputs, input gradients and weight
gradients must match torch's (or the readable reference in ``xlstm/cell.py`` when torch is
missing; ``--layer-norm``: the NumPy backend in float64), and the CuPy backend must match the
NumPy backend. A mismatch stops the run (the cells done so far stay on disk).

Cells run cheapest first; a cell whose estimated time exceeds ``--max-cell-seconds`` or
what is left of ``--budget`` is skipped and listed as such; a cell the backend refuses (a
forced path that does not fit) is an error row. Results go to stdout (a table with the
ratios) and to ``--out`` as JSON, CSV and (with matplotlib) a PNG figure; the JSON and CSV
are rewritten after every cell (``meta.partial`` until the run ends).
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, XlstmError

FULL_HIDDEN = (64, 128, 256, 512, 1024, 2048)
FULL_SEQ = (16, 64, 256)
QUICK_HIDDEN = (64, 256)
QUICK_SEQ = (16, 64)

# float32 results are compared relative to the largest magnitude of the reference
TOLERANCE = {"float32": 2e-3, "float64": 1e-8}
# tf32/bf16 (xlstm and torch both rounding GEMM operands, differently): 20 unit roundoffs, a
# sanity check that catches wrong results (O(1) errors), not a measure of precision (that is
# xlstm.precision_error.error_against_float64, bounded in tests/test_precision.py)
PRECISION_TOLERANCE = {"tf32": 20 * 2.0 ** -11, "bf16": 20 * 2.0 ** -8}

COLUMNS = [
    "backend", "device", "H", "T", "B", "layers", "layer_norm", "dtype", "precision", "status",
    "fwd_ms", "step_ms", "fwd_tokens_per_s", "step_tokens_per_s",
    "floor_fwd_ms", "floor_step_ms", "fwd_over_floor", "step_over_floor",
    "torch_fwd_ms", "torch_step_ms", "fwd_over_torch", "step_over_torch",
    "speedup_vs_numpy", "peak_mem_mb", "alloc_peak_mb", "torch_peak_mem_mb",
    "check_max_rel_err", "repeats", "cell_seconds", "foreign_cpu_load",
    "cuda_graphs", "first_step_ms", "graph_capture_s", "graph_mb", "pool_growth_mb",
    "floor_captured", "host_fwd_us", "host_bwd_us", "note",
]


class BenchCheckError(XlstmError):
    """The results of a cell disagree with the reference: nothing was timed."""


# -- small helpers --------------------------------------------------------------------------
def _parse_ints(text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _try_import_torch():
    try:
        import torch  # noqa: F401
        return torch
    except Exception:  # not installed or broken: the torch columns stay empty
        return None


def _blas_info() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: v for k, v in d.items() if k in ("internal_api", "version", "architecture",
                                                  "num_threads", "threading_layer", "prefix")}
            for d in threadpool_info()]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or None
    except Exception:
        return None


def machine_info(torch=None, backends=()) -> dict:
    """What the numbers were measured on: CPU, cores, BLAS (threadpoolctl), versions."""
    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "blas": _blas_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                if os.environ.get(k) is not None},
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    for be in backends:
        if be.name == "cupy":
            try:
                cp = be.xp
                props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
                name = props["name"]
                info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
                info["cupy"] = cp.__version__
                info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
            except Exception as e:  # informative only
                info["gpu"] = f"unknown ({e})"
            if torch is not None and torch.cuda.is_available():
                info["cudnn"] = torch.backends.cudnn.version()
                info["torch_tf32"] = "off (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)"
    return info


def _rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / max(scale, 1e-30)) if a.size else 0.0


class ForeignLoad:
    """CPU time spent by everything but this process during a span, in cores (Linux /proc/stat).

    On a shared machine other work steals cores; the number is kept with every cell so that a
    noisy cell can be told from a slow one."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system

    def cores(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max((busy - self.busy0) - (self._own() - self.own0), 0.0) / max(wall, 1e-9)


# -- peak memory ------------------------------------------------------------------------------
def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_peak_rss_mb(fn) -> float | None:
    """The process's peak RSS during ``fn()`` in MiB (Linux: VmHWM, reset to the current RSS first).

    This is the whole process (interpreter, libraries, the other contenders' models), so compare
    it between contenders of one cell; ``numpy_alloc_peak_mb`` is the step's own share."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    fn()
    peak = _proc_status_kb("VmHWM")
    return None if peak is None else peak / 1024.0


def numpy_alloc_peak_mb(fn) -> float:
    """Peak of the memory NumPy allocated during ``fn()`` (tracemalloc sees NumPy's buffers)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return max(peak - base, 0) / 2 ** 20


def cupy_pool_peak_mb(backend, fn) -> float:
    """Peak bytes in use in CuPy's default memory pool during ``fn()``, above the level before."""
    xp = backend.xp
    pool = xp.get_default_memory_pool()
    backend.synchronize()
    base = pool.used_bytes()
    peak = [base]

    def malloc(nbytes):
        mem = pool.malloc(nbytes)
        used = pool.used_bytes()
        if used > peak[0]:
            peak[0] = used
        return mem

    xp.cuda.set_allocator(malloc)
    try:
        fn()
        backend.synchronize()
    finally:
        xp.cuda.set_allocator(pool.malloc)
    return (peak[0] - base) / 2 ** 20


def cupy_first_call(backend, fn) -> dict:
    """The first call of a cell on CuPy (where CUDA graphs are captured) against what it left:
    first_step_ms (host wall time, synchronised), graph_capture_s (host time capturing),
    graph_mb (buffers the new graphs own), pool_growth_mb (CuPy pool bytes in use after - before)."""
    pool = backend.xp.get_default_memory_pool()
    graphs = getattr(backend, "graphs", None)
    active = bool(getattr(backend, "graphs_active", lambda: False)())
    before = graphs.stats() if graphs is not None else None
    backend.synchronize()
    used = pool.used_bytes()
    t0 = time.perf_counter()
    fn()
    out = dict(cuda_graphs="on" if active else "off", first_step_ms=(time.perf_counter() - t0) * 1e3,
               pool_growth_mb=(pool.used_bytes() - used) / 2 ** 20)
    if graphs is not None:
        after = graphs.stats()
        out.update(graph_capture_s=after["capture_seconds"] - before["capture_seconds"],
                   graph_mb=(after["bytes"] - before["bytes"]) / 2 ** 20)
    return out


# -- the GEMM floor ---------------------------------------------------------------------------
class GemmFloor:
    """The GEMMs of one training step of the layer, alone, with the layer's operand layouts.

    Per layer: forward ``X2 @ W`` into the gate buffer, then T times ``h[t] @ U`` (into the
    step's gate rows); backward T times ``dz[t] @ U^T`` (U^T made contiguous once per call,
    as the layer does), then ``X2^T @ dZ`` (dW), ``H_prev^T @ dZ`` (dU), ``dZ @ W^T`` (dx).
    Buffers are allocated once here; the timed calls only multiply. Small per-step GEMMs run
    on one OpenBLAS thread, as in the NumPy backend (``numpy_backend.SMALL_GEMM_MACS``).
    With a precision other than float32 the products are the backend's in that mode (U and U^T
    rounded once per call, as the layer does; on NumPy that includes the emulation's rounding).

    On the cupy backend the floor is timed the way the layer runs (issue 10: "within 1.15x of
    its own GEMM floor" must compare like with like): every product goes through the
    backend's ``matmul`` / ``matmul_add`` as in ``lstm.py`` (the per-step ones into the gate
    rows and dh with beta = 1, through ``CublasGemm``), and where the backend replays CUDA
    graphs (``graphs_active()``) each layer's two per-step loops are captured once into a
    graph and replayed (``captured`` True); U^T is still copied per call, outside the graph,
    and the tf32/bf16 weight operands are rounded once, at the capture.
    """

    def __init__(self, xp, T, B, D, H, layers, dtype, seed=0, backend=None, precision="float32"):
        rng = np.random.default_rng(seed)
        self.xp, self.T = xp, T
        self.backend, self.precision = backend, precision
        self.layer_like = getattr(backend, "name", None) == "cupy"
        self.captured = self.layer_like and bool(getattr(backend, "graphs_active", lambda: False)())
        self.graphs = {}
        if self.layer_like:
            self.mm = lambda a, b, out: backend.matmul(a, b, out=out, precision=precision)
            self.operand = lambda a: backend.gemm_operand(a, precision)
        elif precision == "float32" or backend is None:
            self.mm = lambda a, b, out: xp.matmul(a, b, out=out)
            self.operand = lambda a: a
        else:
            self.mm = lambda a, b, out: backend.matmul(a, b, out=out, precision=precision)
            self.operand = lambda a: backend.gemm_operand(a, precision)

        def arr(*shape):
            return xp.asarray(rng.standard_normal(shape).astype(dtype) * 0.1)

        self.layers = []
        for k in range(layers):
            Dk = D if k == 0 else H
            self.layers.append(dict(
                x2=arr(T * B, Dk), W=arr(Dk, 4 * H), U=arr(H, 4 * H), UT=xp.empty((4 * H, H), dtype),
                gates=xp.empty((T, B, 4 * H), dtype), hs=arr(T + 1, B, H), dz=arr(T, B, 4 * H),
                tmp=xp.empty((B, 4 * H), dtype), dh=xp.zeros((B, H), dtype),
                dW=xp.zeros((Dk, 4 * H), dtype), dU=xp.zeros((H, 4 * H), dtype),
                dx=xp.empty((T * B, Dk), dtype)))

        # the NumPy backend runs small per-step GEMMs on one OpenBLAS thread; so does the floor
        self.one_thread = None
        if xp is np:
            from ..backends.numpy_backend import SMALL_GEMM_MACS, _openblas_threads

            if B * H * 4 * H <= SMALL_GEMM_MACS:
                self.one_thread = _openblas_threads()

    def _loop(self, fn):
        ctl = self.one_thread
        n = ctl[0]() if ctl is not None else 1
        if n > 1:
            ctl[1](1)
        try:
            fn()
        finally:
            if n > 1:
                ctl[1](n)

    def _replayed(self, key, loop):
        """``loop()`` once, as its graph: the first call runs it eagerly (so handles, scratch and
        kernels exist: capture must not allocate) and captures it without running it; later
        calls replay the graph."""
        g = self.graphs.get(key)
        if g is None:
            from ..backends.cuda_graphs import capture

            loop()
            self.graphs[key] = capture(self.xp, loop)
            return
        g.launch(self.xp.cuda.get_current_stream())

    def _weights(self, L, name, make):
        """The per-call weight operand; with graphs the one captured (stable address)."""
        if not self.captured:
            return self.operand(make())
        if name not in L:
            L[name] = self.operand(make())
        return L[name]

    def forward(self):
        T = self.T
        for k, L in enumerate(self.layers):
            mm = self.mm
            mm(L["x2"], L["W"], L["gates"].reshape(L["x2"].shape[0], -1))
            hs, tmp, gates = L["hs"], L["tmp"], L["gates"]
            U = self._weights(L, "Uop", lambda: L["U"])
            if self.layer_like:
                be, P = self.backend, self.precision

                def loop():
                    for t in range(T):
                        be.matmul_add(hs[t], U, gates[t], P)
            else:
                def loop():
                    for t in range(T):
                        mm(hs[t], U, tmp)
            if self.captured:
                self._replayed((k, "forward"), loop)
            else:
                self._loop(loop)

    def backward(self):
        xp, T = self.xp, self.T
        for k in reversed(range(len(self.layers))):
            L = self.layers[k]
            mm = self.mm
            H = L["U"].shape[0]
            dz, dh = L["dz"], L["dh"]
            if self.layer_like:
                L["UT"][...] = L["U"].T            # the layer's per-call U^T copy, outside the loop
                UT = self._weights(L, "UTop", lambda: L["UT"])
                be, P = self.backend, self.precision

                def loop():
                    for t in range(T - 1, -1, -1):
                        be.matmul_add(dz[t], UT, dh, P)
            else:
                UT = self.operand(xp.ascontiguousarray(L["U"].T))

                def loop():
                    for t in range(T - 1, -1, -1):
                        mm(dz[t], UT, dh)
            if self.captured:
                self._replayed((k, "backward"), loop)
            else:
                self._loop(loop)
            dz2 = dz.reshape(-1, dz.shape[2])
            if self.layer_like:
                be, P = self.backend, self.precision
                be.matmul_add(L["x2"].T, dz2, L["dW"], P)
                be.matmul_add(L["hs"][:-1].reshape(-1, H).T, dz2, L["dU"], P)
            else:
                mm(L["x2"].T, dz2, L["dW"])
                mm(L["hs"][:-1].reshape(-1, H).T, dz2, L["dU"])
            mm(dz2, L["W"].T, L["dx"])

    def step(self):
        self.forward()
        self.backward()


def step_flops(T, B, D, H, layers) -> float:
    """Multiply-adds x2 of one training step: 6 GEMMs of [T*B x D_k x 4H] size per layer."""
    total = 0.0
    for k in range(layers):
        Dk = D if k == 0 else H
        total += 2.0 * T * B * 4 * H * (Dk + H) * 3  # forward (x, h) + backward (dh, dx) + (dW, dU)
    return total


# -- reference without torch -----------------------------------------------------------------
def reference_step(params: dict, x, dy, layers: int, forget_bias: float):
    """Forward + backward of a stacked LSTM with ``xlstm/cell.py`` in float64 (no torch needed).

    Returns y [T,B,H], dx [T,B,D] and grads {name: array}.
    """
    from ..cell import step_backward, step_forward

    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    T, B, _ = x.shape
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    inp, caches = x, []
    for k in range(layers):
        W, U, b = p[f"l{k}.W"], p[f"l{k}.U"], p[f"l{k}.b"]
        H = U.shape[0]
        h, c = np.zeros((B, H)), np.zeros((B, H))
        ys, cs = [], []
        for t in range(T):
            h, c, cache = step_forward(inp[t], h, c, W, U, b, forget_bias)
            ys.append(h)
            cs.append(cache)
        caches.append(cs)
        inp = np.stack(ys)
    y = inp
    grads = {}
    d_out = dy
    for k in reversed(range(layers)):
        W, U = p[f"l{k}.W"], p[f"l{k}.U"]
        H = U.shape[0]
        dh, dc = np.zeros((B, H)), np.zeros((B, H))
        dWs, dUs, dbs = np.zeros_like(W), np.zeros_like(U), np.zeros(4 * H)
        d_in = np.zeros((T, B, W.shape[0]))
        for t in reversed(range(T)):
            dx_t, dh, dc, dW, dU, db = step_backward(d_out[t], dh, dc, W, U, caches[k][t])
            d_in[t] = dx_t
            dWs += dW
            dUs += dU
            dbs += db
        grads[f"l{k}.W"], grads[f"l{k}.U"], grads[f"l{k}.b"] = dWs, dUs, dbs
        d_out = d_in
    return y, d_out, grads


def layer_norm_reference_step(params: dict, x, dy, cell):
    """The LayerNorm LSTM's forward + backward on the NumPy backend in float64, same weights
    (torch has none to compare with; its gradients are checked by finite differences in the
    tests). Returns y, dx and grads as ``reference_step``."""
    import xlstm
    from xlstm.backends import resolve

    ref = xlstm.LSTM(x.shape[2], cell.H, num_layers=cell.layers, layer_norm=True, forget_bias=0.0,
                     dtype="float64", backend=resolve("numpy"))
    for k, v in params.items():
        ref.params[k][...] = v
    ref.zero_grad()
    y, _ = ref.forward(np.asarray(x, np.float64))
    dx, _ = ref.backward(np.asarray(dy, np.float64))
    return y, dx, {k: np.array(g) for k, g in ref.grads.items()}


# -- one cell ----------------------------------------------------------------------------------
@dataclass
class Cell:
    H: int
    T: int
    B: int
    layers: int

    @property
    def D(self):
        return self.H

    def flops(self):
        return step_flops(self.T, self.B, self.D, self.H, self.layers)


@dataclass
class Contender:
    name: str
    fn: object
    times: list = field(default_factory=list)

    def median_ms(self):
        return statistics.median(self.times) * 1e3 if self.times else None


class CellRunner:
    """Builds the models and inputs of one cell on one backend; checks; times."""

    def __init__(self, cell: Cell, backend, dtype: str, torch, seed: int = 0, use_torch: bool = True,
                 precision: str = "float32", layer_norm: bool = False):
        import xlstm
        from xlstm import interop

        self.cell, self.backend, self.dtype, self.seed = cell, backend, dtype, seed
        self.precision, self.layer_norm = precision, layer_norm
        # torch has no LayerNorm LSTM cell: that model is checked against the NumPy backend
        self.torch = torch if use_torch and not layer_norm else None
        xp = backend.xp
        H, T, B, D, L = cell.H, cell.T, cell.B, cell.D, cell.layers
        rng = np.random.default_rng(seed)
        self.x_host = rng.standard_normal((T, B, D)).astype(dtype)
        self.dy_host = (rng.standard_normal((T, B, H)) * 0.1).astype(dtype)
        self.x = backend.asarray(self.x_host)
        self.dy = backend.asarray(self.dy_host)
        self.tdevice = "cuda" if backend.name == "cupy" else "cpu"
        if self.torch is None:
            self.lstm = xlstm.LSTM(D, H, num_layers=L, forget_bias=0.0, dtype=dtype, seed=seed,
                                   backend=backend, layer_norm=layer_norm)
        else:
            tt = self.torch
            # the weights come from torch's CPU initialisation whether or not torch can run on
            # this backend's device: every backend of a cell must get the same model, or the
            # check of CuPy against NumPy compares two different networks
            tt.manual_seed(seed)
            tlstm = tt.nn.LSTM(D, H, num_layers=L).to(dtype=getattr(tt, dtype))
            self.lstm = interop.from_torch(tlstm, dtype=dtype, backend=backend)
            if self.tdevice == "cuda" and not tt.cuda.is_available():
                self.torch = None               # nothing to time torch against on this device
            else:
                if self.tdevice == "cuda":
                    # the same precision on both sides: float32 turns TF32 tensor cores off (they
                    # would fail the 2e-3 check at long T); --precision tf32 turns them on; bf16
                    # runs torch under autocast(bfloat16) (see _autocast)
                    tt.backends.cudnn.allow_tf32 = precision == "tf32"
                    tt.backends.cuda.matmul.allow_tf32 = precision == "tf32"
                self.tlstm = tlstm.to(device=self.tdevice)
                self.tx = tt.from_numpy(self.x_host).to(self.tdevice).requires_grad_(True)
                self.tdy = tt.from_numpy(self.dy_host).to(self.tdevice)
        self.lstm.precision = precision
        self.floor = GemmFloor(xp, T, B, D, H, L, np.dtype(dtype), seed=seed, backend=backend, precision=precision)

    def _autocast(self):
        """torch's side of --precision bf16: autocast(bfloat16) (cuDNN's LSTM in bf16 on a GPU);
        a no-op context otherwise (tf32 is the allow_tf32 switches; on the CPU torch has none)."""
        import contextlib

        if self.precision != "bf16":
            return contextlib.nullcontext()
        return self.torch.autocast(device_type=self.tdevice, dtype=self.torch.bfloat16)

    # the timed functions: each ends with the device synchronised
    def xlstm_fwd(self):
        self.lstm.forward(self.x)
        self.backend.synchronize()

    def xlstm_step(self):
        self.lstm.forward(self.x)
        self.lstm.backward(self.dy)
        self.backend.synchronize()

    def _tsync(self):
        if self.tdevice == "cuda":
            self.torch.cuda.synchronize()

    def torch_fwd(self):
        with self.torch.no_grad(), self._autocast():
            self.tlstm(self.tx)
        self._tsync()

    def torch_step(self):
        self.tx.grad = None
        with self._autocast():
            y, _ = self.tlstm(self.tx)
        y.backward(self.tdy.to(y.dtype))
        self._tsync()

    def host_us_per_step(self, repeats: int = 5) -> dict:
        """Host time per time step per pass (issue 10: at most 8 us), in us: forward and backward
        each timed with perf_counter around the call alone, the device idle before it
        (synchronised) and not waited for after it; median over ``repeats``, divided by T x
        layers. A call that waits on the device inside (an input check reading a flag) counts
        that wait too, so these are upper bounds of the host's own work."""
        be, T, L = self.backend, self.cell.T, self.cell.layers
        fwd, bwd = [], []
        for _ in range(max(1, repeats)):
            be.synchronize()
            t0 = time.perf_counter()
            self.lstm.forward(self.x)
            fwd.append(time.perf_counter() - t0)
            be.synchronize()
            t0 = time.perf_counter()
            self.lstm.backward(self.dy)
            bwd.append(time.perf_counter() - t0)
            be.synchronize()
        per = 1e6 / (T * L)
        return {"host_fwd_us": statistics.median(fwd) * per, "host_bwd_us": statistics.median(bwd) * per}

    def floor_fwd(self):
        self.floor.forward()
        self.backend.synchronize()

    def floor_step(self):
        self.floor.step()
        self.backend.synchronize()

    # -- correctness before timing --------------------------------------------------------
    def run_once(self):
        """One forward+backward from zero grads; returns host copies (y, dx, grads).

        Copies, because the timing runs that follow keep accumulating into ``lstm.grads``: on
        NumPy a plain ``to_numpy`` would be that very buffer, and the CuPy cell compared against
        it would see the sum of every timed step (issue 9)."""
        be = self.backend
        self.lstm.zero_grad()
        y, _ = self.lstm.forward(self.x)
        dx, _ = self.lstm.backward(self.dy)
        be.synchronize()
        grads = {k: be.to_numpy(v, copy=True) for k, v in self.lstm.grads.items()}
        return be.to_numpy(y, copy=True), be.to_numpy(dx, copy=True), grads

    def check(self, other=None) -> float:
        """Max relative error against torch (or the float64 reference) and ``other`` (host results)."""
        y, dx, grads = self.run_once()
        tol = TOLERANCE[self.dtype] if self.precision == "float32" else PRECISION_TOLERANCE[self.precision]
        errs = {}
        if self.torch is not None:
            from xlstm import interop

            for p in self.tlstm.parameters():
                p.grad = None
            self.tx.grad = None
            with self._autocast():
                ty, _ = self.tlstm(self.tx)
            ty.backward(self.tdy.to(ty.dtype))
            self._tsync()
            errs["y vs torch"] = _rel_err(y, ty.detach().float().cpu().numpy())
            errs["dx vs torch"] = _rel_err(dx, self.tx.grad.detach().cpu().numpy())
            ours = interop.to_torch_state_dict(self.lstm, grads=True)
            for name, p in self.tlstm.named_parameters():
                errs[f"d{name} vs torch"] = _rel_err(ours[name], p.grad.detach().cpu().numpy())
        else:
            params = {k: self.backend.to_numpy(v) for k, v in self.lstm.params.items()}
            if self.layer_norm:
                ry, rdx, rgrads = layer_norm_reference_step(params, self.x_host, self.dy_host, self.cell)
            else:
                ry, rdx, rgrads = reference_step(params, self.x_host, self.dy_host, self.cell.layers,
                                                 self.lstm.forget_bias)
            errs["y vs reference"] = _rel_err(y, ry)
            errs["dx vs reference"] = _rel_err(dx, rdx)
            for k, g in rgrads.items():
                errs[f"d{k} vs reference"] = _rel_err(grads[k], g)
        if other is not None:
            oy, odx, ograds = other
            errs["y vs numpy backend"] = _rel_err(y, oy)
            errs["dx vs numpy backend"] = _rel_err(dx, odx)
            for k, g in ograds.items():
                errs[f"d{k} vs numpy backend"] = _rel_err(grads[k], g)
        bad = {k: v for k, v in errs.items() if not (v <= tol)}
        if bad:
            worst = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])[:4])
            raise BenchCheckError(
                f"{self.backend.name} H={self.cell.H} T={self.cell.T} B={self.cell.B} "
                f"layers={self.cell.layers} {self.dtype}: results disagree (tolerance {tol:g}): {worst}")
        self.host_results = (y, dx, grads)
        return max(errs.values()) if errs else 0.0

    def contenders(self):
        out = [Contender("xlstm_fwd", self.xlstm_fwd), Contender("xlstm_step", self.xlstm_step),
               Contender("floor_fwd", self.floor_fwd), Contender("floor_step", self.floor_step)]
        if self.torch is not None:
            out += [Contender("torch_fwd", self.torch_fwd), Contender("torch_step", self.torch_step)]
        return out

    def memory(self) -> dict:
        m = {}
        if self.backend.name == "cupy":
            m["peak_mem_mb"] = cupy_pool_peak_mb(self.backend, self.xlstm_step)
            if self.torch is not None:
                tc = self.torch.cuda
                tc.synchronize()
                base = tc.memory_allocated()
                tc.reset_peak_memory_stats()
                self.torch_step()
                m["torch_peak_mem_mb"] = (tc.max_memory_allocated() - base) / 2 ** 20
        else:
            alloc = []                     # one step for both: RSS peak and NumPy's traced peak
            m["peak_mem_mb"] = host_peak_rss_mb(lambda: alloc.append(numpy_alloc_peak_mb(self.xlstm_step)))
            m["alloc_peak_mb"] = alloc[0]
            if self.torch is not None:
                m["torch_peak_mem_mb"] = host_peak_rss_mb(self.torch_step)
        return m


def time_interleaved(contenders, repeats: int, warmup: int, rounds: int = 3, settle_s: float = 0.12) -> None:
    """Block-interleaved timing: ``rounds`` rounds, each timing every contender in a block.

    A contender's calls are split over the rounds (rotating the order between rounds), so
    load from elsewhere hits every contender alike; inside a block the calls run back to back.
    Before each block the process sleeps ``settle_s`` and runs ``warmup`` untimed calls: BLAS and
    OpenMP worker threads busy-wait for a while after their last parallel call (OpenBLAS about
    0.1 s), and on a 2-core machine one library's spinning threads would otherwise be timed as
    the next library's cost (measured here: 2-100x slower when NumPy and torch calls alternate).
    """
    n = len(contenders)
    rounds = max(1, min(rounds, repeats))
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for r in range(rounds):
        for j in range(n):
            c = contenders[(r + j) % n]
            if settle_s:
                time.sleep(settle_s)
            for _ in range(warmup):
                c.fn()
            for _ in range(per_round[r]):
                t0 = time.perf_counter()
                c.fn()
                c.times.append(time.perf_counter() - t0)


# -- the run --------------------------------------------------------------------------------
def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _progress(total, enabled):
    """A tqdm bar on a terminal; None (plain progress lines) when piped or tqdm is missing."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="xlstm bench", unit="cell", file=sys.stderr, dynamic_ncols=True)


class Planner:
    """Predicts a cell's seconds from the step time per flop of the last cell run (cheapest first).

    Small cells overestimate the time per flop (Python overhead), so the prediction for the
    next, larger cell errs on the long side; each finished cell refines it.
    """

    def __init__(self, args):
        self.args = args
        self.start = time.perf_counter()
        self.step_sec_per_flop = {}

    def plan(self, est_step: float):
        """(repeats, warmup) for a cell whose training step takes about ``est_step`` seconds."""
        a = self.args
        repeats = int(min(a.repeat, max(a.min_repeat, a.target_seconds / max(est_step, 1e-9))))
        warmup = 1 if est_step * 4.4 < 2.0 else 0
        return repeats, warmup

    def predict(self, est_step: float, torch_on: bool = True) -> float:
        """Seconds for the whole cell: check, warm-up, timed rounds, memory, settling pauses."""
        a = self.args
        repeats, warmup = self.plan(est_step)
        per_call = est_step * (4.4 if torch_on else 2.7)   # steps + forwards of all contenders
        memory = 0.0 if a.no_memory else 2 * est_step
        return (2 * est_step + per_call * (repeats + warmup * a.rounds) + memory
                + a.rounds * 6 * a.settle + 0.5)

    def estimate(self, backend_name, cell, torch_on=True) -> float | None:
        k = self.step_sec_per_flop.get(backend_name)
        return None if k is None else self.predict(k * cell.flops(), torch_on)

    def learn(self, backend_name, cell, step_seconds):
        self.step_sec_per_flop[backend_name] = step_seconds / cell.flops()

    def left(self):
        return self.args.budget - (time.perf_counter() - self.start)


def _empty_row(cell, backend, args) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(backend=backend.name, device="gpu" if backend.name == "cupy" else "cpu",
               H=cell.H, T=cell.T, B=cell.B, layers=cell.layers, dtype=args.dtype,
               precision=args.precision, layer_norm=bool(getattr(args, "layer_norm", False)), note="")
    return row


def bench_cell(cell, backend, args, torch, planner, numpy_results=None):
    """Check, time and measure one cell on one backend; returns a result row (dict)."""
    row = _empty_row(cell, backend, args)
    torch_on = torch is not None and not args.no_torch and not args.layer_norm
    est = planner.estimate(backend.name, cell, torch_on)
    if est is not None and (est > args.max_cell_seconds or est > planner.left()):
        why = (f"estimated {est:.0f} s > --max-cell-seconds {args.max_cell_seconds:g}"
               if est > args.max_cell_seconds else
               f"estimated {est:.0f} s > {max(planner.left(), 0):.0f} s left of --budget {args.budget:g}")
        row.update(status="skipped", note=why)
        return row, None
    t_cell = time.perf_counter()
    load = ForeignLoad()
    runner = CellRunner(cell, backend, args.dtype, torch, seed=args.seed, use_torch=not args.no_torch,
                        precision=args.precision, layer_norm=args.layer_norm)
    other = None
    if numpy_results is not None:
        other = numpy_results.get((cell.H, cell.T, cell.B, cell.layers))
    if getattr(backend, "graphs", None) is not None:  # CuPy, before anything else: the capture, if any
        row.update(cupy_first_call(backend, runner.xlstm_step))
    row["check_max_rel_err"] = runner.check(other)   # also the first warm-up of both models
    t0 = time.perf_counter()
    runner.xlstm_step()
    est_step = time.perf_counter() - t0
    planner.learn(backend.name, cell, est_step)
    contenders = runner.contenders()
    repeats, warmup = planner.plan(est_step)
    # small cells: one untimed call before each block; large ones (a round of several seconds)
    # are warm after the check (the floor's buffers are touched once here)
    if warmup == 0:
        runner.floor_step()
    time_interleaved(contenders, repeats, warmup, rounds=args.rounds, settle_s=args.settle)
    row["foreign_cpu_load"] = load.cores()
    med = {c.name: c.median_ms() for c in contenders}
    toks = cell.T * cell.B
    row.update(status="ok", repeats=repeats,
               fwd_ms=med["xlstm_fwd"], step_ms=med["xlstm_step"],
               floor_fwd_ms=med["floor_fwd"], floor_step_ms=med["floor_step"],
               torch_fwd_ms=med.get("torch_fwd"), torch_step_ms=med.get("torch_step"))
    row["fwd_tokens_per_s"] = toks / (row["fwd_ms"] / 1e3)
    row["step_tokens_per_s"] = toks / (row["step_ms"] / 1e3)
    row["fwd_over_floor"] = _ratio(row["fwd_ms"], row["floor_fwd_ms"])
    row["step_over_floor"] = _ratio(row["step_ms"], row["floor_step_ms"])
    row["fwd_over_torch"] = _ratio(row["fwd_ms"], row["torch_fwd_ms"])
    row["step_over_torch"] = _ratio(row["step_ms"], row["torch_step_ms"])
    if backend.name == "cupy":
        row["floor_captured"] = runner.floor.captured
        row.update(runner.host_us_per_step())
    if not args.no_memory:
        row.update(runner.memory())
    row["cell_seconds"] = time.perf_counter() - t_cell
    planner.learn(backend.name, cell, row["step_ms"] / 1e3)
    return row, runner.host_results


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 1e5:
            return f"{v:.3g}"
        if v >= 100:
            return f"{v:.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def _kind(r) -> str:
    """dtype, GEMM precision and cell of a row, for the tables' group titles."""
    prec = r.get("precision") or "float32"
    return (r["dtype"] + ("" if prec == "float32" else f" ({prec} GEMMs)")
            + (", LayerNorm cell" if r.get("layer_norm") else ""))


def format_table(rows) -> str:
    """The readable table: one block per backend/batch/dtype, ratios measured in the same run."""
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["backend"], r["B"], _kind(r)), []).append(r)
    for (be, B, dtype), rs in groups.items():
        has_speedup = any(r.get("speedup_vs_numpy") for r in rs)
        lines.append(f"\n{be} backend ({'GPU' if be == 'cupy' else 'CPU'}), B={B}, {dtype}; times in ms "
                     f"(medians); torch = nn.LSTM on the same device; peak MB = "
                     f"{'pool peak above the start' if be == 'cupy' else 'process RSS peak'}")
        hdr = (f"{'L':>2} {'H':>5} {'T':>4} | {'fwd':>9} {'step':>9} {'tok/s':>8} | {'floor':>9} "
               f"{'step/fl':>7} | {'torch fwd':>9} {'torch stp':>9} {'fwd/tch':>7} {'stp/tch':>7} | "
               f"{'peak MB':>7} {'alloc MB':>8}" + (f" | {'vs numpy':>8}" if has_speedup else ""))
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for r in sorted(rs, key=lambda r: (r["layers"], r["H"], r["T"])):
            if r["status"] != "ok":
                lines.append(f"{r['layers']:>2} {r['H']:>5} {r['T']:>4} | {r['status']}: {r['note']}")
                continue
            line = (f"{r['layers']:>2} {r['H']:>5} {r['T']:>4} | {_fmt(r['fwd_ms']):>9} {_fmt(r['step_ms']):>9} "
                    f"{_fmt(r['step_tokens_per_s']):>8} | {_fmt(r['floor_step_ms']):>9} "
                    f"{_fmt(r['step_over_floor']):>7} | {_fmt(r['torch_fwd_ms']):>9} {_fmt(r['torch_step_ms']):>9} "
                    f"{_fmt(r['fwd_over_torch']):>7} {_fmt(r['step_over_torch']):>7} | {_fmt(r['peak_mem_mb'], 1):>7} "
                    f"{_fmt(r.get('alloc_peak_mb'), 1):>8}")
            if (r.get("foreign_cpu_load") or 0) > 0.25:
                line += f"  (other load {r['foreign_cpu_load']:.1f} cores)"
            if r.get("first_step_ms") is not None:     # cupy: first call (capture) vs steady state
                line += (f"  (graphs {r.get('cuda_graphs')}: first step {_fmt(r['first_step_ms'])} ms, "
                         f"graphs {_fmt(r.get('graph_mb'), 1)} MB, pool +{_fmt(r.get('pool_growth_mb'), 1)} MB)")
            if has_speedup:
                line += f" | {_fmt(r.get('speedup_vs_numpy'), 1):>8}"
            lines.append(line)
    return "\n".join(lines)


def markdown_table(rows) -> str:
    """The summary as a Markdown table (for READMEs): one line per cell, the ratios of that run."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["backend"], r["B"], _kind(r)), []).append(r)
    for (be, B, dtype), rs in groups.items():
        sp = any(r.get("speedup_vs_numpy") for r in rs)
        out.append(f"\n**{be}** ({'GPU' if be == 'cupy' else 'CPU'}), B={B}, {dtype}, times in ms (medians)\n")
        out.append("| layers | H | T | fwd | step | tokens/s | GEMM floor | step/floor | torch step | step/torch "
                   "| floor/torch | other load |" + (" CuPy/NumPy speedup |" if sp else ""))
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if sp else ""))
        for r in sorted(rs, key=lambda r: (r["layers"], r["H"], r["T"])):
            if r["status"] != "ok":
                out.append(f"| {r['layers']} | {r['H']} | {r['T']} | {r['status']}: {r['note']} |||||||||"
                           + ("|" if sp else ""))
                continue
            out.append(f"| {r['layers']} | {r['H']} | {r['T']} | {_fmt(r['fwd_ms'])} | {_fmt(r['step_ms'])} | "
                       f"{_fmt(r['step_tokens_per_s'])} | {_fmt(r['floor_step_ms'])} | "
                       f"{_fmt(r['step_over_floor'])} | {_fmt(r['torch_step_ms'])} | {_fmt(r['step_over_torch'])} | "
                       f"{_fmt(_ratio(r['floor_step_ms'], r['torch_step_ms']))} | "
                       f"{_fmt(r.get('foreign_cpu_load'), 1)} |"
                       + (f" {_fmt(r.get('speedup_vs_numpy'), 1)} |" if sp else ""))
    return "\n".join(out)


def write_outputs(result: dict, out_dir: str, stem: str, plot: bool = True) -> dict:
    """JSON, CSV and (when matplotlib is installed) PNG under ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    paths["json"] = os.path.join(out_dir, stem + ".json")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=float)
        f.write("\n")
    paths["csv"] = os.path.join(out_dir, stem + ".csv")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    if plot:
        png = os.path.join(out_dir, stem + ".png")
        why = plot_results(result, png)
        if why is None:
            paths["png"] = png
        else:
            paths["png_skipped"] = why
    return paths


def plot_results(result: dict, path: str) -> str | None:
    """Time vs H per T (each backend, torch and the floor), and ratios/speedups below.

    Returns None when written, or why not (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'xlstm[plot]')"
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return "no timed cells"
    Ts = sorted({r["T"] for r in rows})
    layers = min(r["layers"] for r in rows)
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(2, len(Ts), figsize=(5 * len(Ts), 8.5), squeeze=False)
    colors = {"numpy": "tab:blue", "cupy": "tab:green"}
    for j, T in enumerate(Ts):
        ax, ax2 = axes[0][j], axes[1][j]
        for B in batches:
            sel = [r for r in rows if r["T"] == T and r["layers"] == layers and r["B"] == B]
            sfx = f" B={B}" if len(batches) > 1 else ""
            ls = "-" if B == batches[0] else ":"
            for be in ("numpy", "cupy"):
                rs = sorted((r for r in sel if r["backend"] == be), key=lambda r: r["H"])
                if not rs:
                    continue
                Hs = [r["H"] for r in rs]
                dev = "GPU" if be == "cupy" else "CPU"
                ax.plot(Hs, [r["step_ms"] for r in rs], ls, marker="o", color=colors[be], label=f"xlstm {be}{sfx}")
                ax.plot(Hs, [r["floor_step_ms"] for r in rs], ls, marker=".", color=colors[be], alpha=0.45,
                        label=f"GEMM floor {dev}{sfx}")
                tr = [(r["H"], r["torch_step_ms"]) for r in rs if r["torch_step_ms"]]
                if tr:
                    ax.plot(*zip(*tr), ls, marker="s", color="tab:red" if be == "numpy" else "tab:purple",
                            label=f"torch {'CPU' if be == 'numpy' else 'cuDNN'}{sfx}")
                ax2.plot(Hs, [r["step_over_floor"] for r in rs], ls, marker=".", color=colors[be],
                         alpha=0.45, label=f"{be} step / floor{sfx}")
                rt = [(r["H"], r["step_over_torch"]) for r in rs if r["step_over_torch"]]
                if rt:
                    ax2.plot(*zip(*rt), ls, marker="s", color=colors[be], label=f"{be} / torch{sfx}")
                sp = [(r["H"], r["speedup_vs_numpy"]) for r in rs if r.get("speedup_vs_numpy")]
                if sp:
                    ax2.plot(*zip(*sp), ls, marker="^", color="black", label=f"CuPy speedup over NumPy{sfx}")
        ax.set(xscale="log", yscale="log", xlabel="hidden size H (input = H)", ylabel="training step (ms)",
               title=f"T={T}, {layers} layer{'s' if layers > 1 else ''}, {rows[0]['dtype']}")
        ax.set_xticks(sorted({r['H'] for r in rows}))
        ax.set_xticklabels([str(h) for h in sorted({r['H'] for r in rows})])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        ax2.axhline(1.0, color="gray", lw=0.8)
        ax2.set(xscale="log", yscale="log", xlabel="hidden size H", ylabel="ratio (x)",
                title="ratios" + ("" if any(r.get("speedup_vs_numpy") for r in rows)
                                  else " (no CuPy results in this run)"))
        ax2.set_xticks(sorted({r['H'] for r in rows}))
        ax2.set_xticklabels([str(h) for h in sorted({r['H'] for r in rows})])
        ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax2.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
    m = result.get("meta", {})
    fig.suptitle(f"xlstm bench: {m.get('machine', {}).get('cpu', '')} "
                 f"{('/ ' + m['machine']['gpu']) if m.get('machine', {}).get('gpu') else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"a small subset (H {QUICK_HIDDEN}, T {QUICK_SEQ}, 1 layer) in well under a minute")
    parser.add_argument("--hidden", type=_parse_ints, default=None, help="hidden sizes, e.g. 64,256")
    parser.add_argument("--seq-len", type=_parse_ints, default=None, help="sequence lengths, e.g. 16,64")
    parser.add_argument("--batch", type=_parse_ints, default=(32,), help="batch size(s), default 32")
    parser.add_argument("--layers", type=_parse_ints, default=None, help="layer counts, default 1,2")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--precision", choices=("float32", "tf32", "bf16"), default="float32",
                        help="GEMM operand precision of xlstm (float32 accumulation) and of torch's side: "
                             "tf32 = cuDNN/cuBLAS TF32 on, bf16 = torch.autocast(bfloat16); on the numpy "
                             "backend an emulation, slower than float32 (default float32)")
    parser.add_argument("--backends", default="available",
                        help="comma-separated backends (numpy,cupy) or 'available' (default)")
    parser.add_argument("--no-torch", action="store_true", help="do not time torch even when installed")
    parser.add_argument("--torch-module", action="store_true",
                        help="time a training step of xlstm.torch.LSTM beside torch.nn.LSTM (xlstm/bench/torch_module.py)")
    parser.add_argument("--layer-norm", action="store_true",
                        help="the LayerNorm LSTM cell (torch has none: not timed; results checked against "
                             "the NumPy backend in float64)")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default=None,
                        help="CuPy: replay each layer's time loop as a CUDA graph (on) or run it eagerly "
                             "(off); default: the backend's setting (XLSTM_CUDA_GRAPHS, on)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for NumPy's BLAS (via threadpoolctl) and torch; default: leave as is")
    parser.add_argument("--repeat", type=int, default=None, help="at most this many timed calls per contender and cell")
    parser.add_argument("--min-repeat", type=int, default=3, help="at least this many timed calls per contender")
    parser.add_argument("--rounds", type=int, default=4,
                        help="timed calls of each contender are split over this many interleaved blocks")
    parser.add_argument("--settle", type=float, default=0.12,
                        help="seconds of sleep before each timed block, so the previous library's "
                             "worker threads stop spinning (default 0.12)")
    parser.add_argument("--target-seconds", type=float, default=None,
                        help="aim for about this many seconds of timing per contender and cell")
    parser.add_argument("--max-cell-seconds", type=float, default=None,
                        help="skip a cell estimated to take longer (default 150, quick 20)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; cells that would not fit are skipped (default 840, quick 45)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--persistent", choices=("auto", "on", "off"), default=None,
                        help="CuPy: force the persistent kernels (on), the per-step kernels (off), or "
                             "let the crossover table pick (auto); default XLSTM_PERSISTENT, else off")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for JSON/CSV/PNG")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default bench-<backends>[-quick])")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--markdown", action="store_true",
                        help="with --load: print the summary as Markdown tables (for a README)")
    parser.add_argument("--load", nargs="+", default=None, metavar="JSON",
                        help="do not run: print the table from saved JSON results (several files are "
                             "merged, e.g. a CPU and a GPU run); with --name also write them (JSON, CSV, PNG)")


def _warm_up_process(backends, args, torch):
    """One tiny untimed cell per backend first: imports, first-call set-up and thread pools.
    A backend that refuses the tiny cell (a forced path that does not fit it) is left to say
    so in the grid's own cells."""
    for be in backends:
        try:
            r = CellRunner(Cell(8, 4, 2, 1), be, args.dtype, torch, seed=args.seed, use_torch=not args.no_torch,
                           precision=args.precision, layer_norm=args.layer_norm)
            r.check()
            for c in r.contenders():
                c.fn()
        except BenchCheckError:
            raise
        except XlstmError as e:
            print(f"xlstm bench: warm-up of {be.name} refused ({type(e).__name__}: {e})", file=sys.stderr)


def _resolve_backends(spec: str):
    from xlstm.backends import available_backends, resolve

    names = available_backends() if spec == "available" else [s.strip() for s in spec.split(",") if s.strip()]
    return [resolve(n) for n in names]


def _apply_threads(n, torch):
    if n is None:
        return None
    if torch is not None:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("xlstm bench: threadpoolctl is not installed; NumPy's BLAS threads left as they are",
              file=sys.stderr)
        return None
    return threadpool_limits(limits=n, user_api="blas")


def run(args) -> int:
    if args.load:
        return _run_load(args)
    if args.torch_module:
        from .torch_module import run as run_torch_module
        return run_torch_module(args, time_interleaved)
    if getattr(args, "precision", "float32") != "float32" and args.dtype != "float32":
        raise InputError(f"--precision {args.precision} rounds float32 GEMM operands, so it needs --dtype float32 "
                         f"(got --dtype {args.dtype})")
    quick = args.quick
    hidden = args.hidden or (QUICK_HIDDEN if quick else FULL_HIDDEN)
    seqs = args.seq_len or (QUICK_SEQ if quick else FULL_SEQ)
    layers = args.layers or ((1,) if quick else (1, 2))
    args.repeat = args.repeat or (7 if quick else 25)
    args.target_seconds = args.target_seconds if args.target_seconds is not None else (0.1 if quick else 0.6)
    args.max_cell_seconds = args.max_cell_seconds or (20.0 if quick else 150.0)
    args.budget = args.budget or (45.0 if quick else 840.0)
    backends = _resolve_backends(args.backends)
    for be in backends:
        if args.cuda_graphs is not None and hasattr(be, "cuda_graphs"):
            be.cuda_graphs = args.cuda_graphs == "on"
        if args.persistent is not None and hasattr(be, "persistent"):
            be.persistent = args.persistent
    torch = None if args.no_torch else _try_import_torch()
    limiter = _apply_threads(args.threads, torch)
    cells = [Cell(H, T, B, L) for B in args.batch for L in layers for H in hidden for T in seqs]
    cells.sort(key=lambda c: (c.flops(), c.layers, c.H))
    command = "xlstm bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    meta = {"command": command, "argv": sys.argv, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(torch, backends), "backends": [b.name for b in backends],
            "hidden": list(hidden), "seq_len": list(seqs), "batch": list(args.batch), "layers": list(layers),
            "dtype": args.dtype, "precision": args.precision, "layer_norm": args.layer_norm, "input_size": "= H",
            "cuda_graphs": {b.name: b.graphs_active() for b in backends if hasattr(b, "graphs_active")},
            "persistent": args.persistent,
            "timing": "medians of interleaved rounds after warm-up, "
            "GPU synchronised after every call (perf_counter)"}
    print(f"xlstm bench: {len(cells)} cells x {len(backends)} backend(s) {[b.name for b in backends]}, "
          f"{args.dtype}, precision {args.precision}, torch {'off' if torch is None else torch.__version__}; budget {args.budget:g} s, "
          f"cells over {args.max_cell_seconds:g} s skipped", file=sys.stderr)
    stem = args.name or ("bench-" + "-".join(b.name for b in backends) + ("-quick" if quick else ""))
    planner = Planner(args)
    bar = _progress(len(cells) * len(backends), not args.no_progress)
    rows, numpy_host = [], {}
    try:
        _warm_up_process(backends, args, torch)
        # cell by cell (cheapest first), so a tight budget cuts every backend at the same size;
        # numpy first in each cell: its results are what the cupy backend is checked against
        order = sorted(backends, key=lambda b: b.name != "numpy")
        for cell in cells:
            numpy_host.clear()
            for be in order:
                label = f"{be.name} L={cell.layers} H={cell.H} T={cell.T} B={cell.B}"
                if bar is not None:
                    bar.set_postfix_str(label)
                elif not args.no_progress:
                    print(f"[{len(rows) + 1}/{len(cells) * len(backends)}] {label}", file=sys.stderr, flush=True)
                try:
                    row, host = bench_cell(cell, be, args, torch, planner,
                                           numpy_host if be.name == "cupy" else None)
                except BenchCheckError:
                    raise
                except XlstmError as e:
                    # this cell cannot run as asked (e.g. --persistent on where U does not fit):
                    # the row says why and the grid goes on
                    row, host = _empty_row(cell, be, args), None
                    row.update(status="error", note=f"{type(e).__name__}: {e}")
                    print(f"xlstm bench: {label}: {row['note']}", file=sys.stderr)
                if be.name == "numpy" and host is not None:
                    numpy_host[(cell.H, cell.T, cell.B, cell.layers)] = host
                rows.append(row)
                # what is done so far, on disk after every cell: a run killed by a time limit
                # keeps its finished cells (meta "partial": true until the run ends)
                write_outputs({"meta": dict(meta, partial=True), "rows": rows}, args.out, stem, plot=False)
                if bar is not None:
                    bar.update(1)
                gc.collect()
    except BenchCheckError as e:
        if bar is not None:
            bar.close()
        print(f"xlstm bench: check failed, nothing more timed: {e}", file=sys.stderr)
        write_outputs({"meta": dict(meta, partial=True, check_failed=str(e)), "rows": rows}, args.out, stem,
                      plot=False)
        return 1
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    if bar is not None:
        bar.close()
    # CuPy over NumPy, same cell
    by = {(r["backend"], r["H"], r["T"], r["B"], r["layers"]): r for r in rows}
    for r in rows:
        if r["backend"] == "cupy" and r["status"] == "ok":
            n = by.get(("numpy", r["H"], r["T"], r["B"], r["layers"]))
            if n and n["status"] == "ok":
                r["speedup_vs_numpy"] = n["step_ms"] / r["step_ms"]
    meta["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["elapsed_s"] = time.perf_counter() - planner.start
    meta["skipped"] = [f"{r['backend']} L={r['layers']} H={r['H']} T={r['T']} B={r['B']}: {r['note']}"
                       for r in rows if r["status"] != "ok"]
    result = {"meta": meta, "rows": rows}
    print(format_table(rows))
    if meta["skipped"]:
        print("\nskipped:\n  " + "\n  ".join(meta["skipped"]))
    paths = write_outputs(result, args.out, stem, plot=not args.no_plot)
    print(f"\nelapsed {meta['elapsed_s']:.0f} s; wrote " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def _run_load(args) -> int:
    rows, metas = [], []
    for p in args.load:
        with open(p) as f:
            res = json.load(f)
        rows += res["rows"]
        metas.append(res.get("meta", {}))
    by = {(r["backend"], r["H"], r["T"], r["B"], r["layers"]): r for r in rows}
    for r in rows:
        if r["backend"] == "cupy" and r["status"] == "ok" and not r.get("speedup_vs_numpy"):
            n = by.get(("numpy", r["H"], r["T"], r["B"], r["layers"]))
            if n and n["status"] == "ok":
                r["speedup_vs_numpy"] = n["step_ms"] / r["step_ms"]
    print(markdown_table(rows) if args.markdown else format_table(rows))
    machine = {}
    for m in metas:
        machine.update(m.get("machine", {}))
    result = {"meta": {"merged_from": list(args.load), "machine": machine, "runs": metas}, "rows": rows}
    if args.name:                       # --name STEM: write the merged JSON/CSV (and PNG)
        paths = write_outputs(result, args.out, args.name, plot=not args.no_plot)
        print("\nwrote " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xlstm bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except XlstmError as e:
        print(f"xlstm bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
