"""One LSTM time step, forward and backward, written to be read beside the seed article.

This is the reference: fresh arrays, one equation a line, the article's names for every
gradient (dHt, dOt, dCt, dCprojt, dFt, dIt, dHX, dh_next, dc_next). The backends run the same
math fused and in place (``xlstm/backends``); tests hold them to this file.

Forward of step t (x [B,D], h_prev/c_prev [B,H], W [D,4H], U [H,4H], b [4H]):

    z     = x @ W + h_prev @ U + b                 pre-activations, blocked i, f, g, o
    It    = sigmoid(z_i)
    Ft    = sigmoid(z_f + forget_bias)
    Cproj = tanh(z_g)                              the candidate (TensorFlow's j)
    Ot    = sigmoid(z_o)
    Ct    = Ft * c_prev + It * Cproj
    Ht    = Ot * tanh(Ct)

Optional per-step modifiers (all None in the plain cell): ``gmask`` multiplies Cproj
(recurrent dropout), ``mask`` [B] freezes finished sequences, ``zc``/``zh`` [B,H] are zoneout
carry fractions; see ``xlstm/ops/lstm_cell.py`` for the combined equations.
"""
from __future__ import annotations

import numpy as np

from .gates import sigmoid, split


def carry_fraction(mask, zone, like):
    """k = 1 - mask * (1 - zone) [B,H]: the fraction of the previous state that is kept
    (kc for the cell state, kh for the hidden state); ``like`` gives shape and dtype."""
    m = np.ones(like.shape[0], like.dtype) if mask is None else mask
    z = np.zeros_like(like) if zone is None else zone
    return 1.0 - m[:, None] * (1.0 - z)


def pointwise_forward(z, c_prev, h_prev, forget_bias, mask=None, zc=None, zh=None, gmask=None):
    """Gates and new state from pre-activations z [B,4H]. Returns (gates [B,4H], c, h)."""
    H = c_prev.shape[1]
    z_i, z_f, z_g, z_o = split(z, H)
    It = sigmoid(np, z_i)
    Ft = sigmoid(np, z_f + forget_bias)
    Cproj = np.tanh(z_g)
    Ot = sigmoid(np, z_o)
    Cproj_d = Cproj if gmask is None else Cproj * gmask
    Ct = Ft * c_prev + It * Cproj_d
    Ht = Ot * np.tanh(Ct)
    kc, kh = carry_fraction(mask, zc, c_prev), carry_fraction(mask, zh, h_prev)
    c = kc * c_prev + (1 - kc) * Ct
    h = kh * h_prev + (1 - kh) * Ht
    return np.concatenate([It, Ft, Cproj, Ot], axis=-1), c, h


def pointwise_backward(gates, c_prev, dy, dh_next, dc_next, mask=None, zc=None, zh=None, gmask=None):
    """BPTT through the pointwise part of one step.

    gates [B,4H] (It, Ft, Cproj, Ot), c_prev [B,H]; dy [B,H] gradient of the step's output;
    dh_next, dc_next [B,H] gradients arriving from step t+1.
    Returns (dz [B,4H], dc_prev [B,H], dh_skip [B,H]) where dh_skip is the part of the gradient
    w.r.t. h_prev that bypasses the gates (nonzero only with mask/zoneout); the full
    dh_prev = dh_skip + dz @ U^T (see ``step_backward``).
    """
    r = pointwise_backward_named(gates, c_prev, dy, dh_next, dc_next, mask, zc, zh, gmask)
    return r["dz"], r["dc_prev"], r["dh_skip"]


def pointwise_backward_named(gates, c_prev, dy, dh_next, dc_next, mask=None, zc=None, zh=None, gmask=None):
    """``pointwise_backward`` with every named gradient: a dict of dHt, dOt, dCt, dCprojt, dFt,
    dIt [B,H], dz [B,4H], dc_prev, dh_skip [B,H] (what ``xlstm.trace`` records)."""
    H = c_prev.shape[1]
    It, Ft, Cproj, Ot = split(gates, H)
    m = np.ones(c_prev.shape[0], c_prev.dtype) if mask is None else mask
    gm = np.ones_like(Cproj) if gmask is None else gmask
    kc, kh = carry_fraction(mask, zc, c_prev), carry_fraction(mask, zh, c_prev)
    Ct = Ft * c_prev + It * Cproj * gm               # recomputed, not stored
    tanh_Ct = np.tanh(Ct)

    dHt = m[:, None] * dy + dh_next                  # output gradient plus dh_next from t+1
    dHt_cell = (1 - kh) * dHt                        # the part that reaches this step's cell
    dOt = dHt_cell * tanh_Ct
    dCt = (1 - kc) * dc_next + dHt_cell * Ot * (1 - tanh_Ct ** 2)
    dCprojt = dCt * It * gm
    dFt = dCt * c_prev
    dIt = dCt * Cproj * gm

    dz_i = dIt * It * (1 - It)                       # through the sigmoid
    dz_f = dFt * Ft * (1 - Ft)
    dz_g = dCprojt * (1 - Cproj ** 2)                # through the tanh
    dz_o = dOt * Ot * (1 - Ot)
    dz = np.concatenate([dz_i, dz_f, dz_g, dz_o], axis=-1)

    dc_prev = kc * dc_next + dCt * Ft                # the seed's dc_next for step t-1
    dh_skip = kh * dHt
    return dict(dHt=dHt, dOt=dOt, dCt=dCt, dCprojt=dCprojt, dFt=dFt, dIt=dIt, dz=dz, dc_prev=dc_prev,
                dh_skip=dh_skip)


def step_forward(x, h_prev, c_prev, W, U, b, forget_bias=1.0):
    """The whole step: z = x @ W + h_prev @ U + b, then the gates. Returns (h, c, cache)."""
    z = x @ W + h_prev @ U + b
    gates, c, h = pointwise_forward(z, c_prev, h_prev, forget_bias)
    return h, c, (x, h_prev, c_prev, gates)


def step_backward(dy, dh_next, dc_next, W, U, cache):
    """The whole step backward.

    Returns (dx, dh_prev, dc_prev, dW, dU, db). dHX = dz @ [W; U]^T splits into dxt and
    dh_next for step t-1, as in the article's figure 29.
    """
    x, h_prev, c_prev, gates = cache
    dz, dc_prev, dh_skip = pointwise_backward(gates, c_prev, dy, dh_next, dc_next)
    WU = np.concatenate([W, U], axis=0)              # [D+H, 4H], TensorFlow's kernel layout
    dHX = dz @ WU.T                                  # [B, D+H]
    D = x.shape[1]
    dx, dh_prev = dHX[:, :D], dHX[:, D:] + dh_skip
    dW = x.T @ dz
    dU = h_prev.T @ dz
    db = dz.sum(axis=0)
    return dx, dh_prev, dc_prev, dW, dU, db
