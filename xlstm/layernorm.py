"""Layer norm and the LayerNorm LSTM cell (TensorFlow's ``LayerNormBasicLSTMCell``).

Layer norm of a vector v [N] (one batch row; for the LSTM, one gate block or c_new):

    mean = sum(v) / N            var = sum((v - mean)^2) / N        (biased, as TensorFlow)
    rstd = 1 / sqrt(var + eps)   vhat = (v - mean) * rstd           y = vhat * gain + shift

Backward. With dvhat = dy * gain, and dgain = sum_rows dy * vhat, dshift = sum_rows dy:

    d vhat_j / d v_k = rstd * (delta_jk - 1/N - vhat_j vhat_k / N)

because d mean / d v_k = 1/N and d rstd / d v_k = -rstd^3 (v_k - mean) / N = -rstd^2 vhat_k / N,
so d vhat_j / d v_k = rstd (delta_jk - 1/N) + (v_j - mean) d rstd / d v_k. Summing over j:

    dv = rstd * (dvhat - mean(dvhat) - vhat * mean(dvhat * vhat))

The LayerNorm LSTM step (no bias; own gain/shift per gate; the NORMALISED cell state is carried):

    z      = x @ W + h_prev @ U                         [B,4H], blocked i, f, g, o
    zn_k   = LN_k(z_k)                                   k in i, f, g, o, each over its H units
    It = sigmoid(zn_i)   Ft = sigmoid(zn_f + forget_bias)   Cproj = tanh(zn_g)   Ot = sigmoid(zn_o)
    c_new  = Ft * c_prev + It * Cproj * gmask            (gmask: recurrent dropout on Cproj)
    cn     = LN_c(c_new)                                 TensorFlow's "state" norm
    h_new  = Ot * tanh(cn)
    c, h   = carry(cn, c_prev, zc), carry(h_new, h_prev, zh)   (mask / zoneout, see xlstm/ops/lstm_cell.py)

Here: the readable reference (fresh arrays, seed names) in ``layer_norm_forward/backward`` and
``ln_cell_forward/backward``, and ``tf_layer_norm_params`` for ``interop.from_tf``. The
layer's time loop is the backend's ``ln_lstm_forward_sequence`` / ``ln_lstm_backward_sequence``
(``xlstm/ops/lstm_sequence.py``) over its fused in-place ``ln_lstm_*_step`` ops.
"""
from __future__ import annotations

import numpy as np

from .checks import host_numpy as _np
from .errors import InputError
from .cell import carry_fraction
from .gates import sigmoid, split


# -- layer norm, readable reference -----------------------------------------------------
def layer_norm_forward(v, gain, shift, eps=1e-12):
    """LN over the last axis. v [...,N], gain/shift [N]. Returns (y, vhat, rstd [...,1])."""
    mean = v.mean(axis=-1, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    vhat = (v - mean) * rstd
    return vhat * gain + shift, vhat, rstd


def layer_norm_backward(dy, vhat, rstd, gain):
    """Gradients of ``layer_norm_forward``: (dv [...,N], dgain, dshift shaped like gain).

    dgain/dshift are summed over the leading axes that gain does not have (the batch rows).
    """
    gain = np.asarray(gain)
    lead = tuple(range(dy.ndim - gain.ndim))
    dgain = (dy * vhat).sum(axis=lead)
    dshift = dy.sum(axis=lead)
    dvhat = dy * gain
    dv = rstd * (dvhat - dvhat.mean(axis=-1, keepdims=True)
                 - vhat * (dvhat * vhat).mean(axis=-1, keepdims=True))
    return dv, dgain, dshift


def _gate_ln_forward(z, gain, shift, eps):
    """LN per gate block: z [B,4H] -> (zn, zhat [B,4H], rstd [B,4])."""
    B, H4 = z.shape
    H = H4 // 4
    zn, zhat, rstd = layer_norm_forward(z.reshape(B, 4, H), gain.reshape(4, H), shift.reshape(4, H), eps)
    return zn.reshape(B, H4), zhat.reshape(B, H4), rstd.reshape(B, 4)


# -- the LayerNorm LSTM step, readable reference --------------------------------------------
def ln_cell_forward(z, c_prev, h_prev, gain, shift, c_gain, c_shift, forget_bias=1.0, eps=1e-12,
                    mask=None, zc=None, zh=None, gmask=None):
    """One LayerNorm LSTM step from raw pre-activations z [B,4H] = x@W + h_prev@U.

    Returns a dict of every named value: zhat, zn [B,4H], rstd [B,4], It, Ft, Cproj, Ot,
    c_new (before LN), chat, cn (= LN(c_new)), rstd_c [B,1], h_new, and the carried c, h [B,H];
    gates [B,4H] = concat(It, Ft, Cproj, Ot) as the fast path stores them.
    """
    zn, zhat, rstd = _gate_ln_forward(z, gain, shift, eps)
    zn_i, zn_f, zn_g, zn_o = split(zn, c_prev.shape[1])
    It = sigmoid(np, zn_i)
    Ft = sigmoid(np, zn_f + forget_bias)
    Cproj = np.tanh(zn_g)
    Ot = sigmoid(np, zn_o)
    gm = np.ones_like(Cproj) if gmask is None else gmask
    c_new = Ft * c_prev + It * Cproj * gm
    cn, chat, rstd_c = layer_norm_forward(c_new, c_gain, c_shift, eps)
    h_new = Ot * np.tanh(cn)
    kc, kh = carry_fraction(mask, zc, c_prev), carry_fraction(mask, zh, h_prev)
    c = kc * c_prev + (1 - kc) * cn
    h = kh * h_prev + (1 - kh) * h_new
    return dict(z=z, zhat=zhat, rstd=rstd, zn=zn, It=It, Ft=Ft, Cproj=Cproj, Ot=Ot, c_new=c_new,
                chat=chat, rstd_c=rstd_c, cn=cn, h_new=h_new, c=c, h=h,
                gates=np.concatenate([It, Ft, Cproj, Ot], axis=-1))


def ln_cell_backward(fwd, c_prev, gain, c_gain, dy, dh_next, dc_next,
                     mask=None, zc=None, zh=None, gmask=None):
    """BPTT through one LayerNorm LSTM step, seed names. ``fwd`` is ``ln_cell_forward``'s dict.

    Returns a dict: dHt (total gradient into h_t), dOt, dCnorm (w.r.t. cn), dCt (w.r.t. c_new,
    the seed's dCt), dCprojt, dFt, dIt, dzn (w.r.t. LN(z)) and dz (w.r.t. raw z) [B,4H],
    dc_prev (the seed's dc_next for step t-1), dh_skip (dh_prev = dh_skip + dz @ U^T), and
    dgain, dshift [4H], dc_gain, dc_shift [H] of this step.
    """
    B, H = c_prev.shape
    It, Ft, Cproj, Ot, cn = fwd["It"], fwd["Ft"], fwd["Cproj"], fwd["Ot"], fwd["cn"]
    m = np.ones(B, c_prev.dtype) if mask is None else mask
    gm = np.ones_like(Cproj) if gmask is None else gmask
    kc, kh = carry_fraction(mask, zc, c_prev), carry_fraction(mask, zh, c_prev)
    tanh_cn = np.tanh(cn)

    dHt = m[:, None] * dy + dh_next
    dHt_cell = (1 - kh) * dHt                        # the part that reaches this step's cell
    dOt = dHt_cell * tanh_cn
    dCnorm = (1 - kc) * dc_next + dHt_cell * Ot * (1 - tanh_cn ** 2)
    dCt, dc_gain, dc_shift = layer_norm_backward(dCnorm, fwd["chat"], fwd["rstd_c"], c_gain)
    dCprojt = dCt * It * gm
    dFt = dCt * c_prev
    dIt = dCt * Cproj * gm
    dzn = np.concatenate([dIt * It * (1 - It), dFt * Ft * (1 - Ft),
                          dCprojt * (1 - Cproj ** 2), dOt * Ot * (1 - Ot)], axis=-1)
    dz3, dgain, dshift = layer_norm_backward(dzn.reshape(B, 4, H), fwd["zhat"].reshape(B, 4, H),
                                             fwd["rstd"].reshape(B, 4, 1), gain.reshape(4, H))
    return dict(dHt=dHt, dOt=dOt, dCnorm=dCnorm, dCt=dCt, dCprojt=dCprojt, dFt=dFt, dIt=dIt,
                dzn=dzn, dz=dz3.reshape(B, 4 * H), dc_prev=kc * dc_next + dCt * Ft, dh_skip=kh * dHt,
                dgain=dgain.reshape(4 * H), dshift=dshift.reshape(4 * H), dc_gain=dc_gain, dc_shift=dc_shift)


# -- TensorFlow names ------------------------------------------------------------------------
TF_LN_GATES = ("input", "forget", "transform", "output")     # our order i, f, g, o


def tf_layer_norm_params(layer_dict, H, prefix) -> dict:
    """Our LN parameters from one TensorFlow LayerNormBasicLSTMCell's norms.

    layer_dict: {"input", "transform", "forget", "output", "state"} -> (gamma [H], beta [H])
    (TensorFlow's ``transform`` is our candidate g). Returns {prefix+"ln_gain": [4H] blocked
    i, f, g, o, prefix+"ln_shift": [4H], prefix+"ln_c_gain": [H], prefix+"ln_c_shift": [H]}.
    """
    if not isinstance(layer_dict, dict):
        raise InputError(f"from_tf: layer_norm entries must be dicts of (gamma, beta) pairs, got {type(layer_dict).__name__}")
    want = TF_LN_GATES + ("state",)
    missing = [n for n in want if n not in layer_dict]
    if missing:
        raise InputError(f"from_tf: layer_norm dict lacks {missing}; expected keys {list(want)}")
    pairs = {}
    for n in want:
        pair = layer_dict[n]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise InputError(f"from_tf: layer_norm[{n!r}] must be a (gamma, beta) pair of [H] arrays")
        gamma, beta = _np(pair[0]), _np(pair[1])
        for a, what in ((gamma, "gamma"), (beta, "beta")):
            if a.shape != (H,):
                raise InputError(f"from_tf: layer_norm[{n!r}] {what} has shape {a.shape}, expected ({H},) [H]")
        pairs[n] = (gamma, beta)
    return {prefix + "ln_gain": np.concatenate([pairs[n][0] for n in TF_LN_GATES]),
            prefix + "ln_shift": np.concatenate([pairs[n][1] for n in TF_LN_GATES]),
            prefix + "ln_c_gain": pairs["state"][0], prefix + "ln_c_shift": pairs["state"][1]}
