"""NumPy backend: the pointwise LSTM step on the CPU, in place.

The readable reference of the same math, with the seed article's names and fresh arrays at
every line, is ``xlstm/cell.py``; tests check this in-place version against it per dtype.
Here every ufunc writes into an existing buffer (``out=``) so the time loop allocates nothing
but a few [B,H] scratch arrays that are reused across steps.
"""
from __future__ import annotations

import contextlib

import numpy as np

from ..errors import InputError
from ..precision import PrecisionEmulationWarning, Rounded, round_operand
from .base import Backend

# Below this many multiply-adds a GEMM runs on one BLAS thread. Measured on a 2-core AMD EPYC
# with NumPy's OpenBLAS 0.3.31: the per-step [32,H]x[H,4H] product takes the same time on one
# thread as on two for H <= 128 (10 us at H=64, 50 us at H=128), while handing it to a second
# thread costs a wake-up each call and, when another process holds a core, up to 20x more.
SMALL_GEMM_MACS = 1 << 22


_WARNED: set = set()


def _warn_emulation(precision: str) -> None:
    """Once per process and mode: the NumPy backend emulates reduced precision, slowly."""
    if precision in _WARNED:
        return
    _WARNED.add(precision)
    import warnings

    warnings.warn(f"precision={precision!r} on the numpy backend is an EMULATION: GEMM operands are rounded to "
                  f"{precision} and multiplied in float32, giving the GPU mode's numbers within its error bound, "
                  "but SLOWER than float32 (extra rounding passes), not faster. Use the cupy backend for speed.",
                  PrecisionEmulationWarning, stacklevel=3)


def _openblas_threads():
    """(get, set) of the thread count of NumPy's own OpenBLAS via ctypes, or None if not found.

    Looks in the wheel's ``numpy.libs`` (scipy-openblas, symbols ``scipy_openblas_*64_``) and
    in the process (a system OpenBLAS). Any failure means: leave BLAS threads alone.
    """
    import ctypes
    import glob
    import os

    cands = []
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    cands += sorted(glob.glob(os.path.join(libdir, "*openblas*")))
    cands.append(None)                                   # symbols already loaded in the process
    for path in cands:
        try:
            lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        except OSError:
            continue
        for pre, suf in (("scipy_", "64_"), ("", "64_"), ("", "")):
            get = getattr(lib, f"{pre}openblas_get_num_threads{suf}", None)
            set_ = getattr(lib, f"{pre}openblas_set_num_threads{suf}", None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                try:
                    if get() >= 1:
                        return get, set_
                except Exception:
                    pass
    return None


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def __init__(self):
        self._scratch: dict = {}
        self._blas_threads = False          # looked up on the first small GEMM

    def _small_gemm_threads(self):
        if self._blas_threads is False:
            try:
                self._blas_threads = _openblas_threads()
            except Exception:
                self._blas_threads = None
        return self._blas_threads

    def asarray(self, a, dtype=None):
        if type(a).__module__.startswith("cupy"):
            a = a.get()
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a, copy: bool = False):
        return np.array(self.asarray(a)) if copy else self.asarray(a)

    def deferred(self):
        from .deferred import HostReads
        return HostReads(self)

    def _tmp(self, key, shape, dtype):
        """A scratch buffer reused across time steps (so the loop does not allocate)."""
        k = (key, shape, dtype)                 # dtype as given: np.dtype(...).str costs ~0.3 us a call
        buf = self._scratch.get(k)
        if buf is None:
            if len(self._scratch) > 64:  # many shapes seen: keep memory bounded
                self._scratch.clear()
            buf = self._scratch[k] = np.empty(shape, dtype)
        return buf

    def _gate_consts(self, shape, dtype):
        """Per-column constants of the [B,4H] gate rows (i, f, g, o), made once per (shape, dtype).

        half: 0.5 on the sigmoid gates i, f, o and 1 on g; bias: 0.5 on i, f, o and 0 on g,
        so ``half * tanh(half * z) + bias`` is sigmoid on i, f, o and tanh on g.
        plus1: 0 on i, f, o and 1 on g, so ``(a + plus1) * (1 - a)`` is the activation
        derivative through its output: a(1-a) for a sigmoid, (1+g)(1-g) = 1-g^2 for tanh.
        Stored at the full [B,4H] shape: a ufunc that broadcasts a [4H] row over B rows
        allocates a [B,4H] buffer on every call (and runs 2-3x slower than same-shape operands).
        """
        k = ("gate_consts", shape, np.dtype(dtype).str)
        consts = self._scratch.get(k)
        if consts is None:
            H = shape[1] // 4
            half = np.full(shape, 0.5, dtype)
            half[:, 2 * H:3 * H] = 1.0
            bias = np.full(shape, 0.5, dtype)
            bias[:, 2 * H:3 * H] = 0.0
            plus1 = np.zeros(shape, dtype)
            plus1[:, 2 * H:3 * H] = 1.0
            consts = self._scratch[k] = (half, bias, plus1)
        return consts

    def _plain_ws(self, shape, dtype):
        """Scratch of the plain backward step, one dict lookup per step: 4 x [B,H], 2 x [B,4H]."""
        k = ("plain_ws", shape, np.dtype(dtype).str)
        ws = self._scratch.get(k)
        if ws is None:
            B, H = shape
            ws = self._scratch[k] = tuple(np.empty((B, H), dtype) for _ in range(4)) + \
                tuple(np.empty((B, 4 * H), dtype) for _ in range(2))
        return ws

    @contextlib.contextmanager
    def _gemm_threads(self, macs):
        """One BLAS thread inside the block when a GEMM of ``macs`` multiply-adds is small (see
        SMALL_GEMM_MACS); otherwise BLAS's threads are left as they are."""
        threads = self._small_gemm_threads() if macs <= SMALL_GEMM_MACS else None
        n = threads[0]() if threads is not None else 1
        if n <= 1:
            yield
            return
        threads[1](1)
        try:
            yield
        finally:
            threads[1](n)

    # -- GEMMs: float32 as is; tf32/bf16 EMULATED (operands rounded, then a float32 GEMM) ------
    def gemm_operand(self, a, precision="float32"):
        if precision == "float32":
            return a
        _warn_emulation(precision)
        return Rounded(round_operand(np.asarray(a), precision), precision)

    def _operand(self, a, precision, key):
        """``a`` as the float32 array the emulated product multiplies (rounded unless it is already)."""
        if isinstance(a, Rounded):
            if a.precision != precision:
                raise InputError(f"a GEMM operand rounded for {a.precision} was given to a {precision} product")
            return a.data.T if a.transposed else a.data
        if precision == "float32":
            return a
        _warn_emulation(precision)
        return round_operand(a, precision, out=self._tmp(key, a.shape, np.float32))

    def matmul(self, a, b, out=None, precision="float32"):
        return np.matmul(self._operand(a, precision, "gemm_a"), self._operand(b, precision, "gemm_b"), out=out)

    def matmul_add(self, a, b, out, precision="float32") -> None:
        a, b = self._operand(a, precision, "gemm_a"), self._operand(b, precision, "gemm_b")
        tmp = self._tmp("mm", out.shape, out.dtype)
        with self._gemm_threads(a.shape[0] * a.shape[1] * b.shape[1]):
            np.matmul(a, b, out=tmp)
        out += tmp

    # -- forward ----------------------------------------------------------------------------
    def lstm_forward_step(self, z, c_prev, h_prev, c, h, forget_bias,
                          mask=None, zc=None, zh=None, gmask=None) -> None:
        H = c.shape[1]
        i, f, g, o = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
        ifo_1, ifo_2 = z[:, :2 * H], o        # the sigmoid gates are two contiguous blocks
        if forget_bias:
            f += forget_bias
        # sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5: one tanh over all four gates, never overflows.
        # The 0.5s are per-column constants (1 and 0 on the g block), so the whole [B,4H] row
        # takes three passes instead of six calls on the i,f and o blocks (fewer calls matter
        # at small H, where each ufunc call costs more than its arithmetic).
        half, bias, _ = self._gate_consts(z.shape, z.dtype)
        z *= half
        np.tanh(z, out=z)
        z *= half
        z += bias
        plain = mask is None and zc is None and zh is None
        c_new = c if plain else self._tmp("c_new", c.shape, c.dtype)
        h_new = h if plain else self._tmp("h_new", h.shape, h.dtype)
        np.multiply(f, c_prev, out=c_new)
        if gmask is None:
            np.multiply(i, g, out=h_new)       # h_new as scratch for i*g
        else:
            np.multiply(g, gmask, out=h_new)
            h_new *= i
        c_new += h_new
        np.tanh(c_new, out=h_new)
        h_new *= o
        if plain:
            return
        self._carry(c_new, c_prev, c, mask, zc)
        self._carry(h_new, h_prev, h, mask, zh)

    def lstm_forward_sequence(self, gates, hs, cs, U, forget_bias,
                              mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """Forward of the plain cell over all T steps (see Backend), with the per-step work cut
        to 10-11 ufunc/GEMM calls; masks, zoneout, dropout, emulated precisions and ``eager()`` (traced
        calls, which check the per-step ops) take the base loop.

        Per step t, with half = 0.5 on the i, f, o columns and 1 on g (``_gate_consts``):

            s      = half * (xW + b)  +  hs[t] @ (U * half)  +  0.5 * forget_bias on f
            gates  = half * tanh(s) + (0.5 on i, f, o; 0 on g)   -> sigmoid(z) on i, f, o; tanh on g
            c[t+1] = f * c[t] + i * g ;   h[t+1] = o * tanh(c[t+1])

        Scaling by 0.5 is exact in binary floating point (no subnormals here), so hoisting it out
        of the loop (into the input gates once and into a scaled copy of U) gives bitwise the
        numbers of the per-step path. forget_bias stays a per-step add after the recurrent
        product: folding it into the input gates would reorder one addition (1 ulp, amplified by
        the recurrence to ~1e-13 in float64 over 64 steps).
        """
        T, B, H4 = gates.shape
        H = H4 // 4
        if not (mask is None and zc is None and zh is None and gmask is None and precision == "float32"
                and not isinstance(U, Rounded) and gates.flags.c_contiguous and not self._force_eager):
            return super().lstm_forward_sequence(gates, hs, cs, U, forget_bias, mask, zc, zh, gmask, precision)
        half, bias, _ = self._gate_consts((B, H4), gates.dtype)
        gates *= half[0]
        fb = 0.5 * forget_bias
        Uh = np.multiply(U, half[0], dtype=gates.dtype)     # U's i, f, o columns halved (exact)
        tmp = self._tmp("fs_mm", (B, H4), gates.dtype)
        x = self._tmp("fs_x", (B, H), gates.dtype)
        # per-step views made once by iterating the arrays (cheaper than indexing in the loop)
        steps = zip(gates, gates[..., :H], gates[..., H:2 * H], gates[..., 2 * H:3 * H], gates[..., 3 * H:],
                    cs[:-1], cs[1:], hs[:-1], hs[1:])
        mm, tanh, mul = np.matmul, np.tanh, np.multiply
        with self._gemm_threads(B * H * H4):
            for z, i, f, g, o, c_prev, c, h_prev, h in steps:
                mm(h_prev, Uh, out=tmp)                     # recurrent GEMM (halved columns)
                z += tmp
                if fb:
                    f += fb
                tanh(z, out=z)
                z *= half
                z += bias                                   # the gates i, f, g, o
                mul(f, c_prev, out=c)
                mul(i, g, out=x)
                c += x
                tanh(c, out=h)
                h *= o

    def _carry(self, new, prev, out, mask, zone):
        """out = k*prev + (1-k)*new with k = 1 - mask*(1-zone), i.e. out = prev + (1-k)*(new-prev)."""
        w = self._tmp("w", new.shape, new.dtype)
        self._one_minus_carry(w, mask, zone)
        np.subtract(new, prev, out=out)
        out *= w
        out += prev

    def _one_minus_carry(self, w, mask, zone):
        """w = 1 - k = mask * (1 - zone), broadcast to [B,H]."""
        if zone is None:
            w[...] = 1.0 if mask is None else mask[:, None]
        else:
            np.subtract(1.0, zone, out=w)
            if mask is not None:
                w *= mask[:, None]

    # -- backward ---------------------------------------------------------------------------
    def lstm_backward_step(self, gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                           mask=None, zc=None, zh=None, gmask=None) -> None:
        H = c_prev.shape[1]
        shape, dt = c_prev.shape, c_prev.dtype
        i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        if mask is None and zc is None and zh is None and gmask is None:
            return self._plain_backward_step(gates, i, f, g, o, c_prev, dy, dh_next, dc_next, dz,
                                             dc_prev, dh_skip)
        dz_i, dz_f, dz_g, dz_o = dz[:, :H], dz[:, H:2 * H], dz[:, 2 * H:3 * H], dz[:, 3 * H:]
        dh = self._tmp("dh", shape, dt)
        gd = self._tmp("gd", shape, dt)        # the candidate after dropout, g * gmask
        tc = self._tmp("tc", shape, dt)        # tanh(c_new), recomputed rather than stored
        dc = self._tmp("dc", shape, dt)        # dCt: gradient w.r.t. c_new
        if mask is None:
            np.add(dy, dh_next, out=dh)
        else:
            np.multiply(dy, mask[:, None], out=dh)
            dh += dh_next
        if gmask is None:
            gd[...] = g
        else:
            np.multiply(g, gmask, out=gd)
        np.multiply(f, c_prev, out=tc)
        np.multiply(i, gd, out=dz_g)           # dz_g as scratch for i*gd
        tc += dz_g
        np.tanh(tc, out=tc)
        plain = mask is None and zc is None and zh is None
        w = self._tmp("w2", shape, dt)
        if plain:
            dh_new, dc_in = dh, dc_next
        else:
            self._one_minus_carry(w, mask, zh)             # 1 - kh
            np.multiply(dh, w, out=dh_skip)                # dh_new, kept in dh_skip for now
            dh_new = dh_skip
            dc_in = self._tmp("dc_in", shape, dt)
            self._one_minus_carry(w, mask, zc)             # 1 - kc
            np.multiply(dc_next, w, out=dc_in)
        self._dz_o_dc(dh_new, tc, o, dc_in, dz_o, dc)
        self._dz_ifg(dc, i, f, g, c_prev, gmask, dz_i, dz_f, dz_g, tc)
        # dc_next for step t-1 and the part of dh_{t-1} that skips the cell
        if plain:
            np.multiply(dc, f, out=dc_prev)
            dh_skip[...] = 0.0
            return
        # kc * dc_next = dc_next - (1-kc) * dc_next = dc_next - dc_in
        np.subtract(dc_next, dc_in, out=tc)
        np.multiply(dc, f, out=dc_prev)
        dc_prev += tc
        np.subtract(dh, dh_new, out=dh_skip)               # kh * dh = dh - (1-kh) * dh

    def _plain_backward_step(self, gates, i, f, g, o, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip):
        """The backward step of the plain cell (no mask, zoneout or dropout): 20 ufunc calls.

        Same equations as the general path below; the four activation derivatives come from
        one pass over the [B,4H] row (see ``_gate_consts``) and the four gate gradients from
        one product of that with the row of their other factors.
        """
        H = c_prev.shape[1]
        dh, tc, dc, x, fac, other = self._plain_ws(c_prev.shape, c_prev.dtype)
        _, _, plus1 = self._gate_consts(gates.shape, gates.dtype)
        np.add(dy, dh_next, out=dh)                        # dHt
        np.multiply(f, c_prev, out=tc)                     # tanh(c_new), recomputed
        np.multiply(i, g, out=x)
        tc += x
        np.tanh(tc, out=tc)
        np.multiply(tc, tc, out=x)                         # dCt = dc_next + dHt * o * (1 - tanh(c)^2)
        np.subtract(1.0, x, out=x)
        x *= o
        x *= dh
        np.add(dc_next, x, out=dc)
        np.subtract(1.0, gates, out=fac)                   # activation derivatives through the outputs
        np.add(gates, plus1, out=dz)
        dz *= fac
        np.multiply(dc, g, out=other[:, :H])               # dIt = dCt * g
        np.multiply(dc, c_prev, out=other[:, H:2 * H])     # dFt = dCt * c_prev
        np.multiply(dc, i, out=other[:, 2 * H:3 * H])      # dCprojt = dCt * i
        np.multiply(dh, tc, out=other[:, 3 * H:])          # dOt = dHt * tanh(c)
        dz *= other
        np.multiply(dc, f, out=dc_prev)                    # dc_next for step t-1
        dh_skip[...] = 0.0

    def lstm_backward_sequence(self, gates, cs, dy, dh, dc, dz, UT,
                               mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """BPTT over all T steps (see Backend); the plain cell is vectorised over time.

        Every factor of the gate gradients that does not depend on the recurrence is computed
        for all T steps at once before the loop (about a dozen [T,B,4H] / [T,B,H] passes), so a
        step runs only the truly recurrent ops: 6 ufunc calls and one GEMM instead of ~20 ufunc
        calls, a GEMM and an add. With the seed article's names, per step t (backwards):

            dHt  = dy[t] + dh_next
            dz_o = dHt * [tanh(Ct) * o(1-o)]                  dOt factor (times o')
            dCt  = dc_next + dHt * [o * (1 - tanh(Ct)^2)]     dCt factor
            dz_i = dCt * [g * i(1-i)]                         dIt factor (times i')
            dz_f = dCt * [C(t-1) * f(1-f)]                    dFt factor (times f')
            dz_g = dCt * [i * (1-g^2)]                        dCprojt factor (times g')
            dc_next for t-1 = dCt * f ;  dh_next for t-1 = dz[t] @ U^T

        The four gate factors are written into dz itself and multiplied in place per step, so
        the only extra memory is the [T,B,H] dCt factor. In the plain cell cs[t+1] is C_t
        itself, so tanh(Ct) comes from the stored states instead of being recomputed per step.
        Masks, zoneout and recurrent dropout take the per-step path of the base class.
        """
        T, B, H4 = gates.shape
        H = H4 // 4
        if not (mask is None and zc is None and zh is None and gmask is None and dz.flags.c_contiguous):
            return super().lstm_backward_sequence(gates, cs, dy, dh, dc, dz, UT, mask, zc, zh, gmask, precision)
        i, f, g, o = gates[..., :H], gates[..., H:2 * H], gates[..., 2 * H:3 * H], gates[..., 3 * H:]
        dz_i, dz_f, dz_g, dz_o = dz[..., :H], dz[..., H:2 * H], dz[..., 2 * H:3 * H], dz[..., 3 * H:]
        tanh_c = np.tanh(cs[1:])                           # tanh(Ct) of every step [T,B,H]
        # activation derivatives through the outputs: a(1-a) on i, f, o; 1 - g^2 on g
        np.subtract(1.0, gates, out=dz)
        dz *= gates
        np.multiply(g, g, out=dz_g)
        np.subtract(1.0, dz_g, out=dz_g)
        # the gate factors, in place in dz
        dz_i *= g                                          # dIt factor:     g * i(1-i)
        dz_f *= cs[:-1]                                    # dFt factor:     C(t-1) * f(1-f)
        dz_g *= i                                          # dCprojt factor: i * (1-g^2)
        dz_o *= tanh_c                                     # dOt factor:     tanh(Ct) * o(1-o)
        dc_fac = tanh_c                                    # dCt factor:     o * (1 - tanh(Ct)^2)
        np.multiply(tanh_c, tanh_c, out=dc_fac)
        np.subtract(1.0, dc_fac, out=dc_fac)
        dc_fac *= o
        dz_icf = dz.reshape(T, B, 4, H)[:, :, :3]          # the i, f, g blocks of a step as [B,3,H]
        dc_b = dc[:, None, :]                              # dCt broadcast over those three blocks
        x = self._tmp("bs_x", dc.shape, dc.dtype)
        UT = self._operand(UT, precision, "bs_UT")         # rounded once (tf32/bf16), not per step
        dz_r = None if precision == "float32" else self._tmp("bs_dz_r", dz.shape[1:], dz.dtype)
        with self._gemm_threads(B * H4 * H):               # the per-step GEMM, as in matmul_add
            for t in reversed(range(T)):
                dh += dy[t]                                # dHt
                dz_o[t] *= dh
                np.multiply(dh, dc_fac[t], out=x)
                dc += x                                    # dCt
                dz_icf[t] *= dc_b
                dc *= f[t]                                 # dc_next for step t-1
                if dz_r is None:
                    np.matmul(dz[t], UT, out=dh)           # dh_next for step t-1
                else:                                      # the same with dz[t] rounded (emulation)
                    np.matmul(round_operand(dz[t], precision, out=dz_r), UT, out=dh)

    def _dz_o_dc(self, dh_new, tanh_c, o, dc_in, dz_o, dc):
        """dOt = dHt*tanh(Ct) through the output sigmoid into dz_o, and dCt = dc_in + dHt*o*(1-tanh(Ct)^2).

        dh_new [B,H]: dHt reaching the cell; tanh_c [B,H]: tanh of the carried cell state (used
        up as scratch); dc_in [B,H]: the dc_next share reaching the cell. Shared by both cells.
        """
        np.multiply(dh_new, tanh_c, out=dz_o)
        self._dsigmoid_mul(dz_o, o)
        np.multiply(tanh_c, tanh_c, out=tanh_c)
        np.subtract(1.0, tanh_c, out=tanh_c)
        tanh_c *= o
        tanh_c *= dh_new
        np.add(dc_in, tanh_c, out=dc)

    def _dz_ifg(self, dc, i, f, g, c_prev, gmask, dz_i, dz_f, dz_g, tmp):
        """dIt = dCt*g*gmask, dCprojt = dCt*i*gmask, dFt = dCt*c_prev, each through its activation.

        Writes dz_i, dz_f, dz_g [B,H] (views of dz); tmp [B,H] is scratch. Shared by the plain and
        the LayerNorm cell, whose dCt differ but whose gates take it the same way.
        """
        np.multiply(dc, g, out=dz_i)
        if gmask is not None:
            dz_i *= gmask
        self._dsigmoid_mul(dz_i, i)
        np.multiply(dc, i, out=dz_g)
        if gmask is not None:
            dz_g *= gmask
        np.multiply(g, g, out=tmp)
        np.subtract(1.0, tmp, out=tmp)
        dz_g *= tmp
        np.multiply(dc, c_prev, out=dz_f)
        self._dsigmoid_mul(dz_f, f)

    def _dsigmoid_mul(self, d, s):
        """d *= s * (1 - s): the sigmoid derivative written through its output s."""
        t = self._tmp("ds", s.shape, s.dtype)
        np.multiply(s, s, out=t)
        np.subtract(s, t, out=t)
        d *= t

    # -- the LayerNorm LSTM step (equations in base.py) -------------------------------------
    @staticmethod
    def _mean_rows(v3, out):
        """out = mean of v3 [B,G,N] over its last axis: np.mean's own two ops (a sum, then a
        division by the count as intp), without its Python wrapper, so bitwise np.mean's result."""
        np.add.reduce(v3, axis=2, out=out)
        np.true_divide(out, np.intp(v3.shape[2]), out=out, casting="unsafe")

    def _ln_rows(self, v3, vhat3, rstd, eps):
        """vhat3 = (v3 - mean) * rstd over the last axis; v3, vhat3 [B,G,N], rstd [B,G] out."""
        mean = self._tmp("ln_mean", rstd.shape, rstd.dtype)
        sq = self._tmp("ln_sq", v3.shape, v3.dtype)
        self._mean_rows(v3, mean)
        np.subtract(v3, mean[:, :, None], out=vhat3)
        np.multiply(vhat3, vhat3, out=sq)
        self._mean_rows(sq, rstd)                  # biased variance
        rstd += eps
        np.sqrt(rstd, out=rstd)
        np.reciprocal(rstd, out=rstd)
        vhat3 *= rstd[:, :, None]

    def _ln_rows_backward(self, d3, vhat3, rstd):
        """d3 <- rstd * (d3 - mean(d3) - vhat3 * mean(d3 * vhat3)): layer norm's dxhat -> dx."""
        m1 = self._tmp("ln_m1", rstd.shape, rstd.dtype)
        m2 = self._tmp("ln_m2", rstd.shape, rstd.dtype)
        prod = self._tmp("ln_prod", d3.shape, d3.dtype)
        self._mean_rows(d3, m1)
        np.multiply(d3, vhat3, out=prod)
        self._mean_rows(prod, m2)
        np.multiply(vhat3, m2[:, :, None], out=prod)
        d3 -= m1[:, :, None]
        d3 -= prod
        d3 *= rstd[:, :, None]

    @staticmethod
    def _check_rows(*arrays):
        """The [B,4H] buffers are viewed as [B,4,H]; a non-contiguous one would be copied by
        reshape and the in-place result lost, so refuse it."""
        for a in arrays:
            if not a.flags.c_contiguous:
                raise ValueError("ln_lstm_*_step: the [B,4H] buffers must be C-contiguous")

    def _acc_rows(self, acc, a, b=None):
        """acc += sum over rows of a (times b): the gain/shift gradients of one step."""
        red = self._tmp("ln_red", acc.shape, acc.dtype)
        if b is not None:
            prod = self._tmp("ln_accprod", a.shape, a.dtype)
            np.multiply(a, b, out=prod)
            a = prod
        np.add.reduce(a, axis=0, out=red)          # np.sum without its wrapper
        acc += red

    def ln_lstm_forward_step(self, z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h,
                             gain, shift, c_gain, c_shift, forget_bias, eps,
                             mask=None, zc=None, zh=None, gmask=None) -> None:
        B, H = c.shape
        self._check_rows(z, zhat)
        self._ln_rows(z.reshape(B, 4, H), zhat.reshape(B, 4, H), rstd, eps)
        np.multiply(zhat, gain, out=z)
        z += shift
        i, f, g, o = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
        if forget_bias:
            f += forget_bias
        # sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5, as in lstm_forward_step
        ifo_1, ifo_2 = z[:, :2 * H], o
        ifo_1 *= 0.5
        ifo_2 *= 0.5
        np.tanh(z, out=z)
        for s in (ifo_1, ifo_2):
            s *= 0.5
            s += 0.5
        plain = mask is None and zc is None and zh is None
        cn = c if plain else self._tmp("c_new", c.shape, c.dtype)
        h_new = h if plain else self._tmp("h_new", h.shape, h.dtype)
        np.multiply(f, c_prev, out=cn)
        np.multiply(g, i, out=h_new)               # h_new as scratch for i*g
        if gmask is not None:
            h_new *= gmask
        cn += h_new                                # c_new, before its layer norm
        self._ln_rows(cn[:, None, :], chat[:, None, :], rstd_c[:, None], eps)
        np.multiply(chat, c_gain, out=cn)
        cn += c_shift                              # cn = LN(c_new): carried and fed to tanh
        np.tanh(cn, out=h_new)
        h_new *= o
        if plain:
            return
        self._carry(cn, c_prev, c, mask, zc)
        self._carry(h_new, h_prev, h, mask, zh)

    def ln_lstm_backward_step(self, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift,
                              dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                              dgain, dshift, dc_gain, dc_shift,
                              mask=None, zc=None, zh=None, gmask=None) -> None:
        B, H = c_prev.shape
        self._check_rows(dz, zhat)
        shape, dt = c_prev.shape, c_prev.dtype
        i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
        dz_i, dz_f, dz_g, dz_o = dz[:, :H], dz[:, H:2 * H], dz[:, 2 * H:3 * H], dz[:, 3 * H:]
        dh = self._tmp("dh", shape, dt)
        dh_new = self._tmp("ln_dh_new", shape, dt)
        dc_in = self._tmp("dc_in", shape, dt)     # (1-kc) * dc_next
        tc = self._tmp("tc", shape, dt)           # tanh(cn), recomputed from chat
        dc = self._tmp("dc", shape, dt)           # dcn, then dCt
        w = self._tmp("w2", shape, dt)
        if mask is None:
            np.add(dy, dh_next, out=dh)
        else:
            np.multiply(dy, mask[:, None], out=dh)
            dh += dh_next
        self._one_minus_carry(w, mask, zh)
        np.multiply(dh, w, out=dh_new)
        self._one_minus_carry(w, mask, zc)
        np.multiply(dc_next, w, out=dc_in)
        np.multiply(chat, c_gain, out=tc)
        tc += c_shift
        np.tanh(tc, out=tc)
        self._dz_o_dc(dh_new, tc, o, dc_in, dz_o, dc)      # here the carried c is LN(c_new)
        self._acc_rows(dc_gain, dc, chat)
        self._acc_rows(dc_shift, dc)
        dc *= c_gain                               # dchat
        self._ln_rows_backward(dc[:, None, :], chat[:, None, :], rstd_c[:, None])   # dCt
        self._dz_ifg(dc, i, f, g, c_prev, gmask, dz_i, dz_f, dz_g, tc)
        # dz holds the gradient w.r.t. LN(z); gain/shift gradients, then layer norm backward
        self._acc_rows(dgain, dz, zhat)
        self._acc_rows(dshift, dz)
        dz *= gain
        self._ln_rows_backward(dz.reshape(B, 4, H), zhat.reshape(B, 4, H), rstd)
        # dc_prev = kc*dc_next + dCt*f, kc*dc_next = dc_next - dc_in (dc_prev may alias dc_next)
        np.subtract(dc_next, dc_in, out=tc)
        np.multiply(dc, f, out=dc_prev)
        dc_prev += tc
        np.subtract(dh, dh_new, out=dh_skip)       # kh * dh
