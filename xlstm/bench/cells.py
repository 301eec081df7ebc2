"""One bench cell: the models and inputs on one backend, the check before timing, the timed
contenders, and ``bench_cell`` which turns them into a result row."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import XlstmError
from .floor import GemmFloor, step_flops
from .machine import (ForeignLoad, cupy_first_call, cupy_pool_peak_mb, host_peak_rss_mb,
                      numpy_alloc_peak_mb)
from .report import COLUMNS, ratio
from .timing import time_interleaved


# float32 results are compared relative to the largest magnitude of the reference
TOLERANCE = {"float32": 2e-3, "float64": 1e-8}
# tf32/bf16 (xlstm and torch both rounding GEMM operands, differently): 20 unit roundoffs, a
# sanity check that catches wrong results (O(1) errors), not a measure of precision (that is
# xlstm.precision_error.error_against_float64, bounded in tests/test_precision.py)
PRECISION_TOLERANCE = {"tf32": 20 * 2.0 ** -11, "bf16": 20 * 2.0 ** -8}


class BenchCheckError(XlstmError):
    """The results of a cell disagree with the reference: nothing was timed."""




def _rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b)) / max(scale, 1e-30)) if a.size else 0.0


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
        """Host time per time step per pass (the target: at most 8 us), in us: forward and backward
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
        it would see the sum of every timed step."""
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
    row["fwd_over_floor"] = ratio(row["fwd_ms"], row["floor_fwd_ms"])
    row["step_over_floor"] = ratio(row["step_ms"], row["floor_step_ms"])
    row["fwd_over_torch"] = ratio(row["fwd_ms"], row["torch_fwd_ms"])
    row["step_over_torch"] = ratio(row["step_ms"], row["torch_step_ms"])
    if backend.name == "cupy":
        row["floor_captured"] = runner.floor.captured
        row.update(runner.host_us_per_step())
    if not args.no_memory:
        row.update(runner.memory())
    row["cell_seconds"] = time.perf_counter() - t_cell
    planner.learn(backend.name, cell, row["step_ms"] / 1e3)
    return row, runner.host_results
