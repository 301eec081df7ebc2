"""The LayerNorm LSTM cell (TensorFlow's LayerNormBasicLSTMCell, the seed's cell), one time step.

Reference: ``xlstm/layernorm.py`` (``ln_cell_forward``, ``ln_cell_backward``; layer norm itself
``layer_norm_forward``/``layer_norm_backward``). CUDA: ``ln_forward_row`` / ``ln_backward_row``
of ``xlstm/kernels/lstm_pointwise.cuh``, one thread block per batch row (its layer-norm sums
are block reductions), then ``ln_accumulate`` sums the rows' gain/shift gradients in row order
(deterministic, unlike atomics).

Layer norm of a vector v [N]: vhat = (v - mean(v)) * rstd, rstd = 1/sqrt(var(v) + eps)
(biased variance), LN(v) = vhat * gain + shift. Per batch row b, each of the four gate blocks
of z is normalised on its own (a reduction over H units), and so is c_new:

    zhat_k = (z_k - mean(z_k)) * rstd_k                     k in i, f, g, o
    i = sigmoid(zhat_i*gain_i + shift_i)   f = sigmoid(zhat_f*gain_f + shift_f + forget_bias)
    g = tanh(zhat_g*gain_g + shift_g)      o = sigmoid(zhat_o*gain_o + shift_o)
    c_new = f * c_prev + i * (g * gmask)
    chat  = (c_new - mean(c_new)) * rstd_c ;  cn = chat * c_gain + c_shift
    h_new = o * tanh(cn)
    c = kc * c_prev + (1 - kc) * cn ;  h = kh * h_prev + (1 - kh) * h_new   (as the plain cell)

The backward step (the seed's names; dxhat -> dx is layer norm's backward):

    dHt = mask*dy + dh_next ;  dHt_cell = (1-kh)*dHt
    dCnorm = (1-kc)*dc_next + dHt_cell * o * (1 - tanh(cn)^2)      gradient w.r.t. cn
    dc_gain += sum_b dCnorm*chat ;  dc_shift += sum_b dCnorm
    dCt = rstd_c * (dchat - mean(dchat) - chat*mean(dchat*chat)),  dchat = dCnorm * c_gain
    dzn_i = dCt*g*gmask*i(1-i)   dzn_f = dCt*c_prev*f(1-f)   dzn_g = dCt*i*gmask*(1-g^2)
    dzn_o = dHt_cell*tanh(cn)*o(1-o)                              gradients w.r.t. LN(z_k)
    dgain += sum_b dzn*zhat ;  dshift += sum_b dzn
    dz_k = rstd_k * (dzhat_k - mean(dzhat_k) - zhat_k*mean(dzhat_k*zhat_k)),  dzhat = dzn*gain
    dc_prev = kc*dc_next + dCt*f ;  dh_skip = kh*dHt       (the caller adds dz @ U^T to dh_skip)
"""
from __future__ import annotations

import numpy as np

from .lstm_cell import (MOD_NAMES, MODIFIERS, activate, carry, carry_back, dz_ifg, dz_o_and_dCt, one_minus_k,
                        total_dHt)
from .spec import Arg, Kernel, OpSpec, Scalar

FORWARD = OpSpec(
    "ln_lstm_forward_step",
    args=(Arg("z", ("B", "4H"), "inout", doc="in: raw x@W + h_prev@U (no bias); out: gates i, f, g, o"),
          Arg("zhat", ("B", "4H"), "out"), Arg("rstd", ("B", 4), "out"),
          Arg("chat", ("B", "H"), "out"), Arg("rstd_c", ("B",), "out"),
          Arg("c_prev", ("B", "H")), Arg("h_prev", ("B", "H")),
          Arg("c", ("B", "H"), "out"), Arg("h", ("B", "H"), "out"),
          Arg("gain", ("4H",)), Arg("shift", ("4H",)), Arg("c_gain", ("H",)), Arg("c_shift", ("H",)),
          Scalar("forget_bias"), Scalar("eps")) + MODIFIERS,
    kernels=(Kernel("ln_lstm_forward_step", ("z", "zhat", "rstd", "chat", "rstd_c", "c_prev", "h_prev", "c", "h",
                                             "gain", "shift", "c_gain", "c_shift", "forget_bias", "eps")
                    + MOD_NAMES + ("B", "H")),),
    summary="LayerNorm LSTM gates and state update of one step")

BACKWARD = OpSpec(
    "ln_lstm_backward_step",
    args=(Arg("gates", ("B", "4H")), Arg("zhat", ("B", "4H")), Arg("rstd", ("B", 4)),
          Arg("chat", ("B", "H")), Arg("rstd_c", ("B",)), Arg("c_prev", ("B", "H")),
          Arg("gain", ("4H",)), Arg("c_gain", ("H",)), Arg("c_shift", ("H",)),
          Arg("dy", ("B", "H")), Arg("dh_next", ("B", "H")), Arg("dc_next", ("B", "H")),
          Arg("dz", ("B", "4H"), "out", doc="gradient w.r.t. the raw pre-activations"),
          Arg("dc_prev", ("B", "H"), "out", doc="may alias dc_next"),
          Arg("dh_skip", ("B", "H"), "out", doc="kh * dHt; may alias dh_next"),
          Arg("dgain", ("4H",), "acc"), Arg("dshift", ("4H",), "acc"),
          Arg("dc_gain", ("H",), "acc"), Arg("dc_shift", ("H",), "acc")) + MODIFIERS,
    kernels=(Kernel("ln_lstm_backward_step", ("gates", "zhat", "rstd", "chat", "rstd_c", "c_prev", "gain", "c_gain",
                                              "c_shift", "dy", "dh_next", "dc_next", "dz", "dc_prev", "dh_skip",
                                              "part") + MOD_NAMES + ("B", "H")),
             Kernel("ln_accumulate", ("part", "dgain", "dshift", "dc_gain", "dc_shift", "B", "H"))),
    scratch=(Arg("part", ("B", "10H"), "out", doc="per-row gain/shift gradient contributions"),),
    summary="gradients of one LayerNorm LSTM step (BPTT)")

SPECS = (FORWARD, BACKWARD)


# -- NumPy ------------------------------------------------------------------------------------------
def mean_rows(v3, out):
    """out = mean of v3 [B,G,N] over its last axis: np.mean's own two ops (a sum, then a
    division by the count as intp), without its Python wrapper, so bitwise np.mean's result."""
    np.add.reduce(v3, axis=2, out=out)
    np.true_divide(out, np.intp(v3.shape[2]), out=out, casting="unsafe")


def _ln_rows(be, v3, vhat3, rstd, eps):
    """vhat3 = (v3 - mean) * rstd over the last axis; v3, vhat3 [B,G,N], rstd [B,G] out."""
    mean = be.tmp("ln_mean", rstd.shape, rstd.dtype)
    sq = be.tmp("ln_sq", v3.shape, v3.dtype)
    mean_rows(v3, mean)
    np.subtract(v3, mean[:, :, None], out=vhat3)
    np.multiply(vhat3, vhat3, out=sq)
    mean_rows(sq, rstd)                        # biased variance
    rstd += eps
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)
    vhat3 *= rstd[:, :, None]


def _ln_rows_backward(be, d3, vhat3, rstd):
    """d3 <- rstd * (d3 - mean(d3) - vhat3 * mean(d3 * vhat3)): layer norm's dxhat -> dx."""
    m1 = be.tmp("ln_m1", rstd.shape, rstd.dtype)
    m2 = be.tmp("ln_m2", rstd.shape, rstd.dtype)
    prod = be.tmp("ln_prod", d3.shape, d3.dtype)
    mean_rows(d3, m1)
    np.multiply(d3, vhat3, out=prod)
    mean_rows(prod, m2)
    np.multiply(vhat3, m2[:, :, None], out=prod)
    d3 -= m1[:, :, None]
    d3 -= prod
    d3 *= rstd[:, :, None]


def _check_rows(*arrays):
    """The [B,4H] buffers are viewed as [B,4,H]; a non-contiguous one would be copied by
    reshape and the in-place result lost, so refuse it."""
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("ln_lstm_*_step: the [B,4H] buffers must be C-contiguous")


def _acc_rows(be, acc, a, b=None):
    """acc += sum over rows of a (times b): the gain/shift gradients of one step."""
    red = be.tmp("ln_red", acc.shape, acc.dtype)
    if b is not None:
        prod = be.tmp("ln_accprod", a.shape, a.dtype)
        np.multiply(a, b, out=prod)
        a = prod
    np.add.reduce(a, axis=0, out=red)          # np.sum without its wrapper
    acc += red


def numpy_forward(be, z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain, shift, c_gain, c_shift,
                  forget_bias, eps, mask=None, zc=None, zh=None, gmask=None) -> None:
    B, H = c.shape
    _check_rows(z, zhat)
    _ln_rows(be, z.reshape(B, 4, H), zhat.reshape(B, 4, H), rstd, eps)
    np.multiply(zhat, gain, out=z)
    z += shift
    i, f, g, o = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
    activate(be, z, forget_bias)
    plain = mask is None and zc is None and zh is None
    cn = c if plain else be.tmp("c_new", c.shape, c.dtype)
    h_new = h if plain else be.tmp("h_new", h.shape, h.dtype)
    np.multiply(f, c_prev, out=cn)
    np.multiply(g, i, out=h_new)               # h_new as scratch for i*g
    if gmask is not None:
        h_new *= gmask
    cn += h_new                                # c_new, before its layer norm
    _ln_rows(be, cn[:, None, :], chat[:, None, :], rstd_c[:, None], eps)
    np.multiply(chat, c_gain, out=cn)
    cn += c_shift                              # cn = LN(c_new): carried and fed to tanh
    np.tanh(cn, out=h_new)
    h_new *= o
    if plain:
        return
    carry(be, cn, c_prev, c, mask, zc)
    carry(be, h_new, h_prev, h, mask, zh)


def numpy_backward(be, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift,
                   dy, dh_next, dc_next, dz, dc_prev, dh_skip, dgain, dshift, dc_gain, dc_shift,
                   mask=None, zc=None, zh=None, gmask=None) -> None:
    B, H = c_prev.shape
    _check_rows(dz, zhat)
    shape, dt = c_prev.shape, c_prev.dtype
    i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
    dz_i, dz_f, dz_g, dz_o = dz[:, :H], dz[:, H:2 * H], dz[:, 2 * H:3 * H], dz[:, 3 * H:]
    dHt = be.tmp("dh", shape, dt)
    dHt_cell = be.tmp("ln_dh_new", shape, dt)
    dc_in = be.tmp("dc_in", shape, dt)       # (1-kc) * dc_next
    tanh_cn = be.tmp("tc", shape, dt)        # tanh(cn), recomputed from chat
    dCt = be.tmp("dc", shape, dt)            # dCnorm, then dCt
    w = be.tmp("w2", shape, dt)
    total_dHt(dy, dh_next, mask, dHt)
    one_minus_k(w, mask, zh)
    np.multiply(dHt, w, out=dHt_cell)
    one_minus_k(w, mask, zc)
    np.multiply(dc_next, w, out=dc_in)
    np.multiply(chat, c_gain, out=tanh_cn)
    tanh_cn += c_shift
    np.tanh(tanh_cn, out=tanh_cn)
    dz_o_and_dCt(be, dHt_cell, tanh_cn, o, dc_in, dz_o, dCt)   # here: dCnorm, w.r.t. cn = LN(c_new)
    _acc_rows(be, dc_gain, dCt, chat)
    _acc_rows(be, dc_shift, dCt)
    dCt *= c_gain                              # dchat
    _ln_rows_backward(be, dCt[:, None, :], chat[:, None, :], rstd_c[:, None])   # dCt
    dz_ifg(be, dCt, i, f, g, c_prev, gmask, dz_i, dz_f, dz_g, tanh_cn)
    # dz holds dzn, the gradient w.r.t. LN(z); gain/shift gradients, then layer norm backward
    _acc_rows(be, dgain, dz, zhat)
    _acc_rows(be, dshift, dz)
    dz *= gain
    _ln_rows_backward(be, dz.reshape(B, 4, H), zhat.reshape(B, 4, H), rstd)
    carry_back(dCt, f, dc_next, dc_in, dHt, dHt_cell, dc_prev, dh_skip, tanh_cn)


# -- CuPy: one thread block per row; the backward adds one ln_accumulate launch ----------------------
def cupy_forward(be, z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain, shift, c_gain, c_shift,
                 forget_bias, eps, mask=None, zc=None, zh=None, gmask=None) -> None:
    values = locals()
    B, H4 = z.shape
    be.launch(FORWARD, "ln_lstm_forward_step", B, be.row_block(H4 // 4), values, dict(B=B, H=H4 // 4),
              getattr(z, "dtype", None))


def cupy_backward(be, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift,
                  dy, dh_next, dc_next, dz, dc_prev, dh_skip, dgain, dshift, dc_gain, dc_shift,
                  mask=None, zc=None, zh=None, gmask=None) -> None:
    values = locals()
    dt = getattr(gates, "dtype", None)
    B, H4 = gates.shape
    dims = dict(B=B, H=H4 // 4)
    values["part"] = be.op_scratch(BACKWARD, "part", dims, dt)
    be.launch(BACKWARD, "ln_lstm_backward_step", B, be.row_block(H4 // 4), values, dims, dt)
    # column sums over the rows, in row order: deterministic, unlike atomics
    be.launch(BACKWARD, "ln_accumulate", be.grid(10 * (H4 // 4)), be.BLOCK, values, dims, dt)


NUMPY = {"ln_lstm_forward_step": numpy_forward, "ln_lstm_backward_step": numpy_backward}
CUPY = {"ln_lstm_forward_step": cupy_forward, "ln_lstm_backward_step": cupy_backward}
