"""The time loop of one layer and direction: forward and BPTT over all T steps, both cells.

The reference is the per-step loop (``forward_loop`` and friends below): per step one
recurrent GEMM (``matmul_add``) and one fused pointwise step (``xlstm.ops.lstm_cell``,
``xlstm.ops.ln_lstm_cell``). Every backend has it (it is ``Backend``'s), and a backend may run
a faster loop that gives the same numbers:

- NumPy (``numpy_forward``, ``numpy_backward``): the plain cell with the 0.5 of the sigmoid
  hoisted out of the loop (bitwise the per-step numbers), and BPTT with every factor that does
  not depend on the recurrence computed for all T steps before the loop.
- CuPy (``cupy_*``): the persistent kernels (``xlstm/kernels/lstm_persistent.cu``: all T steps
  in one cooperative launch, U on chip) where the picker says so and the shape fits, else the
  per-step loop, captured once per shape into a CUDA graph and replayed
  (``xlstm.backends.cuda_graphs``, which copies in what ``SPEC.reads()`` names and out what
  ``SPEC.writes()`` names).

Everything outside the loop (the input GEMM x@W for all steps, dW/dU/dx/db after BPTT, layers,
directions) is ``xlstm/lstm.py``'s.
"""
from __future__ import annotations

import numpy as np

from ..kernels import PERSISTENT_SOURCE
from ..precision import Rounded
from . import gemm, lstm_cell, ln_lstm_cell
from .spec import Arg, Kernel, OpSpec, Scalar

SEQ_MODIFIERS = (Arg("mask", ("T", "B"), optional=True), Arg("zc", ("T", "B", "H"), optional=True),
             Arg("zh", ("T", "B", "H"), optional=True), Arg("gmask", ("T", "B", "H"), optional=True))
_PRECISION = Scalar("precision", "str", doc="of the recurrent GEMMs: float32, tf32 or bf16")

FORWARD = OpSpec(
    "lstm_forward_sequence",
    args=(Arg("gates", ("T", "B", "4H"), "inout", doc="in: x@W + b of every step; out: the gates i, f, g, o"),
          Arg("hs", ("T+1", "B", "H"), "inout", first=True, doc="in: hs[0]; out: the state after every step"),
          Arg("cs", ("T+1", "B", "H"), "inout", first=True),
          Arg("U", ("H", "4H"), doc="recurrent weights, or their gemm_operand"),
          Scalar("forget_bias")) + SEQ_MODIFIERS + (_PRECISION,),
    kernels=(Kernel("lstm_persistent_forward", ("gates", "hs", "cs", "U", "forget_bias") + lstm_cell.MOD_NAMES,
                    source=PERSISTENT_SOURCE),),
    steps=(lstm_cell.FORWARD,),
    summary="forward of the plain cell over all T steps")

BACKWARD = OpSpec(
    "lstm_backward_sequence",
    args=(Arg("gates", ("T", "B", "4H")), Arg("cs", ("T+1", "B", "H")), Arg("dy", ("T", "B", "H")),
          Arg("dh", ("B", "H"), "inout", doc="in: dL/dh_T; out: dL/dh_0"),
          Arg("dc", ("B", "H"), "inout", doc="in: dL/dc_T; out: dL/dc_0"),
          Arg("dz", ("T", "B", "4H"), "out"),
          Arg("UT", ("4H", "H"), doc="U^T (contiguous), or its gemm_operand")) + SEQ_MODIFIERS + (_PRECISION,),
    kernels=(Kernel("lstm_persistent_backward", ("gates", "cs", "dy", "dh", "dc", "dz", "UT") + lstm_cell.MOD_NAMES,
                    source=PERSISTENT_SOURCE),),
    steps=(lstm_cell.BACKWARD,),
    summary="BPTT of the plain cell over all T steps")

LN_FORWARD = OpSpec(
    "ln_lstm_forward_sequence",
    args=(Arg("gates", ("T", "B", "4H"), "inout", doc="in: x@W (no bias); out: the gates"),
          Arg("zhat", ("T", "B", "4H"), "out"), Arg("rstd", ("T", "B", 4), "out"),
          Arg("chat", ("T", "B", "H"), "out"), Arg("rstd_c", ("T", "B"), "out"),
          Arg("hs", ("T+1", "B", "H"), "inout", first=True), Arg("cs", ("T+1", "B", "H"), "inout", first=True),
          Arg("U", ("H", "4H")), Arg("gain", ("4H",)), Arg("shift", ("4H",)),
          Arg("c_gain", ("H",)), Arg("c_shift", ("H",)),
          Scalar("forget_bias"), Scalar("eps")) + SEQ_MODIFIERS + (_PRECISION,),
    steps=(ln_lstm_cell.FORWARD,),
    summary="forward of the LayerNorm cell over all T steps")

LN_BACKWARD = OpSpec(
    "ln_lstm_backward_sequence",
    args=(Arg("gates", ("T", "B", "4H")), Arg("zhat", ("T", "B", "4H")), Arg("rstd", ("T", "B", 4)),
          Arg("chat", ("T", "B", "H")), Arg("rstd_c", ("T", "B")), Arg("cs", ("T+1", "B", "H")),
          Arg("gain", ("4H",)), Arg("c_gain", ("H",)), Arg("c_shift", ("H",)),
          Arg("dy", ("T", "B", "H")), Arg("dh", ("B", "H"), "inout"), Arg("dc", ("B", "H"), "inout"),
          Arg("dz", ("T", "B", "4H"), "out"), Arg("UT", ("4H", "H")),
          Arg("dgain", ("4H",), "acc"), Arg("dshift", ("4H",), "acc"),
          Arg("dc_gain", ("H",), "acc"), Arg("dc_shift", ("H",), "acc")) + SEQ_MODIFIERS + (_PRECISION,),
    steps=(ln_lstm_cell.BACKWARD,),
    summary="BPTT of the LayerNorm cell over all T steps")

SPECS = (FORWARD, BACKWARD, LN_FORWARD, LN_BACKWARD)


# -- the reference: the per-step loop (every backend's, ``Backend``'s methods) ----------------------
def _at(a, t):
    """a[t] for an optional per-step array (None stays None)."""
    return None if a is None else a[t]


def forward_loop(be, gates, hs, cs, U, forget_bias, mask=None, zc=None, zh=None, gmask=None,
                 precision="float32") -> None:
    """Forward of the plain cell over all T steps, in place.

    gates [T,B,4H]: in, x@W + b of every step (the input GEMM, bias folded in); out, the
    post-activation gates i, f, g, o of every step (g before dropout). hs, cs [T+1,B,H]: in,
    the initial state in [0]; out, the (carried) state after step t in [t+1]. U [H,4H] (or its
    ``gemm_operand`` in ``precision``). mask [T,B] | None; zc, zh, gmask [T,B,H] | None
    (``xlstm.ops.lstm_cell``). Per step t: gates[t] += hs[t] @ U, then one ``lstm_forward_step``.
    """
    for t in range(gates.shape[0]):
        be.matmul_add(hs[t], U, gates[t], precision)       # recurrent GEMM
        be.lstm_forward_step(gates[t], cs[t], hs[t], cs[t + 1], hs[t + 1], forget_bias,
                             _at(mask, t), _at(zc, t), _at(zh, t), _at(gmask, t))


def backward_loop(be, gates, cs, dy, dh, dc, dz, UT, mask=None, zc=None, zh=None, gmask=None,
                  precision="float32") -> None:
    """BPTT of the plain cell over all T steps, in place.

    gates [T,B,4H], cs [T+1,B,H]: stored by the forward. dy [T,B,H]: gradient w.r.t. each
    step's output. dh, dc [B,H]: in, dL/dh_T and dL/dc_T; out, dL/dh_0 and dL/dc_0.
    dz [T,B,4H]: out, gradient w.r.t. the pre-activations. UT [4H,H]: U^T (contiguous), or its
    ``gemm_operand``. Per step t (backwards): one ``lstm_backward_step``, then dh += dz[t] @ U^T.
    """
    for t in reversed(range(gates.shape[0])):
        be.lstm_backward_step(gates[t], cs[t], dy[t], dh, dc, dz[t], dc, dh,
                              _at(mask, t), _at(zc, t), _at(zh, t), _at(gmask, t))
        be.matmul_add(dz[t], UT, dh, precision)            # dh_next for step t-1


def ln_forward_loop(be, gates, zhat, rstd, chat, rstd_c, hs, cs, U, gain, shift, c_gain, c_shift,
                    forget_bias, eps, mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
    """Forward of the LayerNorm cell over all T steps, in place (``xlstm.ops.ln_lstm_cell``).

    gates [T,B,4H]: in, x@W of every step (no bias: the cell has none); out, the gates.
    zhat [T,B,4H], rstd [T,B,4], chat [T,B,H], rstd_c [T,B]: out, what backward needs.
    hs, cs [T+1,B,H], U, mask, zc, zh, gmask, precision: as ``forward_loop``; gain, shift [4H];
    c_gain, c_shift [H]; forget_bias, eps: floats.
    """
    for t in range(gates.shape[0]):
        be.matmul_add(hs[t], U, gates[t], precision)       # recurrent GEMM
        be.ln_lstm_forward_step(gates[t], zhat[t], rstd[t], chat[t], rstd_c[t], cs[t], hs[t],
                                cs[t + 1], hs[t + 1], gain, shift, c_gain, c_shift,
                                forget_bias, eps, _at(mask, t), _at(zc, t), _at(zh, t), _at(gmask, t))


def ln_backward_loop(be, gates, zhat, rstd, chat, rstd_c, cs, gain, c_gain, c_shift, dy, dh, dc, dz, UT,
                     dgain, dshift, dc_gain, dc_shift, mask=None, zc=None, zh=None, gmask=None,
                     precision="float32") -> None:
    """BPTT of the LayerNorm cell over all T steps, in place; dgain, dshift [4H], dc_gain,
    dc_shift [H] are accumulated (+=). The rest as ``backward_loop`` and ``ln_forward_loop``."""
    for t in reversed(range(gates.shape[0])):
        be.ln_lstm_backward_step(gates[t], zhat[t], rstd[t], chat[t], rstd_c[t], cs[t],
                                 gain, c_gain, c_shift, dy[t], dh, dc, dz[t], dc, dh,
                                 dgain, dshift, dc_gain, dc_shift,
                                 _at(mask, t), _at(zc, t), _at(zh, t), _at(gmask, t))
        be.matmul_add(dz[t], UT, dh, precision)            # dh_next for step t-1


LOOPS = {"lstm_forward_sequence": forward_loop, "lstm_backward_sequence": backward_loop,
         "ln_lstm_forward_sequence": ln_forward_loop, "ln_lstm_backward_sequence": ln_backward_loop}


# -- NumPy: the plain cell's loops with the per-step work cut down -----------------------------------
def numpy_forward(be, gates, hs, cs, U, forget_bias, mask=None, zc=None, zh=None, gmask=None,
                  precision="float32") -> None:
    """Forward of the plain cell over all T steps (see ``forward_loop``), with the per-step work
    cut to 10-11 ufunc/GEMM calls; masks, zoneout, dropout, emulated precisions and ``eager()``
    (traced calls, which check the per-step ops) take the per-step loop.

    Per step t, with half = 0.5 on the i, f, o columns and 1 on g (``lstm_cell.gate_consts``):

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
            and not isinstance(U, Rounded) and gates.flags.c_contiguous and not be.force_eager):
        return forward_loop(be, gates, hs, cs, U, forget_bias, mask, zc, zh, gmask, precision)
    half, bias = lstm_cell.gate_consts(be, (B, H4), gates.dtype)
    gates *= half[0]
    fb = 0.5 * forget_bias
    Uh = np.multiply(U, half[0], dtype=gates.dtype)     # U's i, f, o columns halved (exact)
    tmp = be.tmp("fs_mm", (B, H4), gates.dtype)
    x = be.tmp("fs_x", (B, H), gates.dtype)
    # per-step views made once by iterating the arrays (cheaper than indexing in the loop)
    steps = zip(gates, gates[..., :H], gates[..., H:2 * H], gates[..., 2 * H:3 * H], gates[..., 3 * H:],
                cs[:-1], cs[1:], hs[:-1], hs[1:])
    mm, tanh, mul = np.matmul, np.tanh, np.multiply
    with be.gemm_threads(B * H * H4):
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


def numpy_backward(be, gates, cs, dy, dh, dc, dz, UT, mask=None, zc=None, zh=None, gmask=None,
                   precision="float32") -> None:
    """BPTT over all T steps (see ``backward_loop``); the plain cell is vectorised over time.

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
    ``dh`` holds dHt and then dh_next, ``dc`` dCt and then dc_next, in place. Masks, zoneout
    and recurrent dropout take the per-step loop.
    """
    T, B, H4 = gates.shape
    H = H4 // 4
    if not (mask is None and zc is None and zh is None and gmask is None and dz.flags.c_contiguous):
        return backward_loop(be, gates, cs, dy, dh, dc, dz, UT, mask, zc, zh, gmask, precision)
    i, f, g, o = gates[..., :H], gates[..., H:2 * H], gates[..., 2 * H:3 * H], gates[..., 3 * H:]
    dz_i, dz_f, dz_g, dz_o = dz[..., :H], dz[..., H:2 * H], dz[..., 2 * H:3 * H], dz[..., 3 * H:]
    tanh_Ct = np.tanh(cs[1:])                          # tanh(Ct) of every step [T,B,H]
    # activation derivatives through the outputs: a(1-a) on i, f, o; 1 - g^2 on g
    np.subtract(1.0, gates, out=dz)
    dz *= gates
    np.multiply(g, g, out=dz_g)
    np.subtract(1.0, dz_g, out=dz_g)
    # the gate factors, in place in dz
    dz_i *= g                                          # dIt factor:     g * i(1-i)
    dz_f *= cs[:-1]                                    # dFt factor:     C(t-1) * f(1-f)
    dz_g *= i                                          # dCprojt factor: i * (1-g^2)
    dz_o *= tanh_Ct                                    # dOt factor:     tanh(Ct) * o(1-o)
    dCt_fac = tanh_Ct                                  # dCt factor:     o * (1 - tanh(Ct)^2)
    np.multiply(tanh_Ct, tanh_Ct, out=dCt_fac)
    np.subtract(1.0, dCt_fac, out=dCt_fac)
    dCt_fac *= o
    dz_icf = dz.reshape(T, B, 4, H)[:, :, :3]          # the i, f, g blocks of a step as [B,3,H]
    dCt_b = dc[:, None, :]                             # dCt broadcast over those three blocks
    x = be.tmp("bs_x", dc.shape, dc.dtype)
    UT = gemm.numpy_operand(be, UT, precision, "bs_UT")    # rounded once (tf32/bf16), not per step
    dz_r = None if precision == "float32" else be.tmp("bs_dz_r", dz.shape[1:], dz.dtype)
    with be.gemm_threads(B * H4 * H):                  # the per-step GEMM, as in matmul_add
        for t in reversed(range(T)):
            dh += dy[t]                                # dHt
            dz_o[t] *= dh
            np.multiply(dh, dCt_fac[t], out=x)
            dc += x                                    # dCt
            dz_icf[t] *= dCt_b
            dc *= f[t]                                 # dc_next for step t-1
            if dz_r is None:
                np.matmul(dz[t], UT, out=dh)           # dh_next for step t-1
            else:                                      # the same with dz[t] rounded (emulation)
                np.matmul(gemm.round_operand(dz[t], precision, out=dz_r), UT, out=dh)


# -- CuPy: persistent kernels where picked, else the per-step loop (eager or a replayed graph) -------
def _dims(gates):
    T, B, H4 = gates.shape
    return dict(T=T, B=B, H=H4 // 4)


def persistent_forward(be, gates, hs, cs, U, forget_bias, mask=None, zc=None, zh=None, gmask=None) -> None:
    """``lstm_forward_sequence`` as one persistent launch (same arguments and results).

    Raises PersistentUnfit when the shape does not fit the device's shared memory or
    co-residency (``persistent_plan`` says why); the per-step loop has no such limit.
    """
    values, dt, dims = locals(), getattr(gates, "dtype", None), _dims(gates)
    args = be.kernel_args(FORWARD, "lstm_persistent_forward", values, dims, dt)
    if dims["T"] > 0:
        be.launch_persistent("lstm_persistent_forward", dt, args, dims["T"], dims["B"], dims["H"])


def persistent_backward(be, gates, cs, dy, dh, dc, dz, UT, mask=None, zc=None, zh=None, gmask=None) -> None:
    """``lstm_backward_sequence`` as one persistent launch (same arguments and results)."""
    values, dt, dims = locals(), getattr(gates, "dtype", None), _dims(gates)
    args = be.kernel_args(BACKWARD, "lstm_persistent_backward", values, dims, dt)
    if dims["T"] > 0:
        be.launch_persistent("lstm_persistent_backward", dt, args, dims["T"], dims["B"], dims["H"])


def cupy_forward(be, gates, hs, cs, U, forget_bias, mask=None, zc=None, zh=None, gmask=None,
                 precision="float32") -> None:
    """``forward_loop``'s result: persistent where picked, else eager or replayed as a graph."""
    B, H = hs.shape[1:]
    be.run_sequence(be.persistent_lstm_forward_sequence,
                     lambda *a: be.graph_or_eager("lstm_forward_sequence", a, {"precision": precision}),
                     B, H, precision, gates, hs, cs, U, forget_bias, mask, zc, zh, gmask)


def cupy_backward(be, gates, cs, dy, dh, dc, dz, UT, mask=None, zc=None, zh=None, gmask=None,
                  precision="float32") -> None:
    """``backward_loop``'s result: persistent where picked, else eager or replayed as a graph."""
    B, H = dh.shape
    be.run_sequence(be.persistent_lstm_backward_sequence,
                     lambda *a: be.graph_or_eager("lstm_backward_sequence", a, {"precision": precision}),
                     B, H, precision, gates, cs, dy, dh, dc, dz, UT, mask, zc, zh, gmask)


def cupy_ln_forward(be, *args, **kwargs) -> None:
    """``ln_forward_loop``'s result, eager or replayed as a graph."""
    be.graph_or_eager("ln_lstm_forward_sequence", args, kwargs)


def cupy_ln_backward(be, *args, **kwargs) -> None:
    """``ln_backward_loop``'s result, eager or replayed as a graph."""
    be.graph_or_eager("ln_lstm_backward_sequence", args, kwargs)


NUMPY = {"lstm_forward_sequence": numpy_forward, "lstm_backward_sequence": numpy_backward}
CUPY = {"lstm_forward_sequence": cupy_forward, "lstm_backward_sequence": cupy_backward,
        "ln_lstm_forward_sequence": cupy_ln_forward, "ln_lstm_backward_sequence": cupy_ln_backward,
        "persistent_lstm_forward_sequence": persistent_forward,
        "persistent_lstm_backward_sequence": persistent_backward}
