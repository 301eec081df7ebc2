"""The plain LSTM cell, one time step: forward and backward (BPTT), fused and in place.

Reference (fresh arrays, one equation a line, the seed article's names): ``xlstm/cell.py``
(``pointwise_forward``, ``pointwise_backward``). CUDA: ``forward_element`` /
``backward_element`` of ``xlstm/kernels/lstm_pointwise.cuh``, launched one thread per (b, j).
The names below are the seed's: It, Ft, Cproj (g), Ot the gates; dHt the total gradient into
h_t, dCt the gradient w.r.t. the new cell state; kc, kh the carry fractions.

Per batch row b and unit j, gates blocked i, f, g, o along 4H:

    i = sigmoid(z_i)   f = sigmoid(z_f + forget_bias)   g = tanh(z_g)   o = sigmoid(z_o)
    c_new = f * c_prev + i * (g * gmask)            # gmask: recurrent dropout on g, else 1
    h_new = o * tanh(c_new)
    kc = 1 - mask * (1 - zc)                         # carry fraction of the cell state
    kh = 1 - mask * (1 - zh)                         # carry fraction of the hidden state
    c = kc * c_prev + (1 - kc) * c_new
    h = kh * h_prev + (1 - kh) * h_new

``mask`` [B] is 1 inside a sequence and 0 past its end (the state is carried unchanged there),
``zc``/``zh`` [B,H] are zoneout carry fractions (a Bernoulli(p) draw in training, p in
evaluation); each is None when unused (mask=1, zc=zh=0, gmask=1).

    dHt      = mask * dy + dh_next                   # total gradient into h_t
    dHt_cell = (1 - kh) * dHt                        # the part that reaches this step's cell
    dCt      = (1 - kc) * dc_next + dHt_cell * o * (1 - tanh(c_new)^2)
    dz_o     = dHt_cell * tanh(c_new) * o * (1 - o)  # dOt through the sigmoid
    dz_i     = dCt * g * gmask * i * (1 - i)         # dIt
    dz_g     = dCt * i * gmask * (1 - g^2)           # dCprojt through the tanh
    dz_f     = dCt * c_prev * f * (1 - f)            # dFt
    dc_prev  = kc * dc_next + dCt * f
    dh_skip  = kh * dHt                              # the caller adds dz @ U^T to get dh_{t-1}
"""
from __future__ import annotations

import numpy as np

from .spec import Arg, Kernel, OpSpec, Scalar

MODIFIERS = (Arg("mask", ("B",), optional=True, doc="1 inside a sequence, 0 past its end"),
         Arg("zc", ("B", "H"), optional=True, doc="zoneout carry fraction of c"),
         Arg("zh", ("B", "H"), optional=True, doc="zoneout carry fraction of h"),
         Arg("gmask", ("B", "H"), optional=True, doc="recurrent-dropout multiplier of g"))
MOD_NAMES = tuple(a.name for a in MODIFIERS)

FORWARD = OpSpec(
    "lstm_forward_step",
    args=(Arg("z", ("B", "4H"), "inout", doc="in: pre-activations; out: gates i, f, g, o (g before dropout)"),
          Arg("c_prev", ("B", "H")), Arg("h_prev", ("B", "H")),
          Arg("c", ("B", "H"), "out"), Arg("h", ("B", "H"), "out"),
          Scalar("forget_bias")) + MODIFIERS,
    kernels=(Kernel("lstm_forward_step", ("z", "c_prev", "h_prev", "c", "h", "forget_bias") + MOD_NAMES
                    + ("B", "H")),),
    summary="gate activations and state update of one step")

BACKWARD = OpSpec(
    "lstm_backward_step",
    args=(Arg("gates", ("B", "4H"), doc="post-activation i, f, g, o of the forward step"),
          Arg("c_prev", ("B", "H")), Arg("dy", ("B", "H")),
          Arg("dh_next", ("B", "H")), Arg("dc_next", ("B", "H")),
          Arg("dz", ("B", "4H"), "out"),
          Arg("dc_prev", ("B", "H"), "out", doc="may alias dc_next"),
          Arg("dh_skip", ("B", "H"), "out", doc="kh * dHt; may alias dh_next")) + MODIFIERS,
    kernels=(Kernel("lstm_backward_step", ("gates", "c_prev", "dy", "dh_next", "dc_next", "dz", "dc_prev",
                                           "dh_skip") + MOD_NAMES + ("B", "H")),),
    summary="gate gradients of one step (BPTT)")

SPECS = (FORWARD, BACKWARD)


# -- NumPy: the same math in place (``out=``), a few [B,H] scratch arrays reused across steps --------
def _make_gate_consts(xp, shape, dtype):
    H = shape[1] // 4
    half = np.full(shape, 0.5, dtype)
    half[:, 2 * H:3 * H] = 1.0
    bias = np.full(shape, 0.5, dtype)
    bias[:, 2 * H:3 * H] = 0.0
    return half, bias


def gate_consts(be, shape, dtype):
    """Per-column constants of the [B,4H] gate rows (i, f, g, o), made once per (shape, dtype).

    half: 0.5 on the sigmoid gates i, f, o and 1 on g; bias: 0.5 on i, f, o and 0 on g,
    so ``half * tanh(half * z) + bias`` is sigmoid on i, f, o and tanh on g.
    Stored at the full [B,4H] shape: a ufunc that broadcasts a [4H] row over B rows
    allocates a [B,4H] buffer on every call (and runs 2-3x slower than same-shape operands).
    """
    return be.scratch.get("gate_consts", shape, dtype, _make_gate_consts)


def one_minus_k(out, mask, zone):
    """out = 1 - k = mask * (1 - zone), the share of the new value, broadcast to [B,H]."""
    if zone is None:
        out[...] = 1.0 if mask is None else mask[:, None]
    else:
        np.subtract(1.0, zone, out=out)
        if mask is not None:
            out *= mask[:, None]


def carry(be, new, prev, out, mask, zone):
    """out = k*prev + (1-k)*new with k = 1 - mask*(1-zone), i.e. out = prev + (1-k)*(new-prev)."""
    w = be.tmp("w", new.shape, new.dtype)
    one_minus_k(w, mask, zone)
    np.subtract(new, prev, out=out)
    out *= w
    out += prev


def activate(be, z, forget_bias) -> None:
    """z [B,4H] (C-contiguous) -> the gates i, f, g, o in place: sigmoid on i, f (after adding
    forget_bias) and o, tanh on g.

    sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5: one tanh over all four gates, never overflows.
    The 0.5s are per-column constants (1 and 0 on the g block, exact), so the whole [B,4H] row
    takes three passes instead of six calls on the i, f and o blocks (fewer calls matter at
    small H, where each ufunc call costs more than its arithmetic). Both cells use it.
    """
    if forget_bias:
        H = z.shape[1] // 4
        z[:, H:2 * H] += forget_bias
    half, bias = gate_consts(be, z.shape, z.dtype)
    z *= half
    np.tanh(z, out=z)
    z *= half
    z += bias


def numpy_forward(be, z, c_prev, h_prev, c, h, forget_bias, mask=None, zc=None, zh=None, gmask=None) -> None:
    H = c.shape[1]
    i, f, g, o = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
    activate(be, z, forget_bias)
    plain = mask is None and zc is None and zh is None
    c_new = c if plain else be.tmp("c_new", c.shape, c.dtype)
    h_new = h if plain else be.tmp("h_new", h.shape, h.dtype)
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
    carry(be, c_new, c_prev, c, mask, zc)
    carry(be, h_new, h_prev, h, mask, zh)


def numpy_backward(be, gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                   mask=None, zc=None, zh=None, gmask=None) -> None:
    H = c_prev.shape[1]
    shape, dt = c_prev.shape, c_prev.dtype
    i, f, g, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:3 * H], gates[:, 3 * H:]
    dz_i, dz_f, dz_g, dz_o = dz[:, :H], dz[:, H:2 * H], dz[:, 2 * H:3 * H], dz[:, 3 * H:]
    dHt = be.tmp("dh", shape, dt)
    gd = be.tmp("gd", shape, dt)          # the candidate after dropout, g * gmask
    tanh_Ct = be.tmp("tc", shape, dt)     # tanh(c_new), recomputed rather than stored
    dCt = be.tmp("dc", shape, dt)
    total_dHt(dy, dh_next, mask, dHt)
    if gmask is None:
        gd[...] = g
    else:
        np.multiply(g, gmask, out=gd)
    np.multiply(f, c_prev, out=tanh_Ct)
    np.multiply(i, gd, out=dz_g)           # dz_g as scratch for i*gd
    tanh_Ct += dz_g
    np.tanh(tanh_Ct, out=tanh_Ct)
    plain = mask is None and zc is None and zh is None
    w = be.tmp("w2", shape, dt)
    if plain:
        dHt_cell, dc_in = dHt, dc_next
    else:
        one_minus_k(w, mask, zh)                       # 1 - kh
        np.multiply(dHt, w, out=dh_skip)               # dHt_cell, kept in dh_skip for now
        dHt_cell = dh_skip
        dc_in = be.tmp("dc_in", shape, dt)
        one_minus_k(w, mask, zc)                       # 1 - kc
        np.multiply(dc_next, w, out=dc_in)
    dz_o_and_dCt(be, dHt_cell, tanh_Ct, o, dc_in, dz_o, dCt)
    dz_ifg(be, dCt, i, f, g, c_prev, gmask, dz_i, dz_f, dz_g, tanh_Ct)
    # dc_next for step t-1 and the part of dh_{t-1} that skips the cell
    if plain:
        np.multiply(dCt, f, out=dc_prev)
        dh_skip[...] = 0.0
        return
    carry_back(dCt, f, dc_next, dc_in, dHt, dHt_cell, dc_prev, dh_skip, tanh_Ct)


def total_dHt(dy, dh_next, mask, dHt):
    """dHt = mask * dy + dh_next [B,H]: the gradient reaching h_t (mask [B] or None). Both cells."""
    if mask is None:
        np.add(dy, dh_next, out=dHt)
    else:
        np.multiply(dy, mask[:, None], out=dHt)
        dHt += dh_next


def carry_back(dCt, f, dc_next, dc_in, dHt, dHt_cell, dc_prev, dh_skip, tmp):
    """The gradients passed to step t-1 around and through the cell, with zoneout/masks (both cells):
    dc_prev = kc*dc_next + dCt*f and dh_skip = kh*dHt, where kc*dc_next = dc_next - dc_in and
    kh*dHt = dHt - dHt_cell. dc_prev may alias dc_next and dh_skip dh_next; tmp [B,H] is scratch."""
    np.subtract(dc_next, dc_in, out=tmp)
    np.multiply(dCt, f, out=dc_prev)
    dc_prev += tmp
    np.subtract(dHt, dHt_cell, out=dh_skip)


def dz_o_and_dCt(be, dHt_cell, tanh_c, o, dc_in, dz_o, dCt):
    """dOt = dHt*tanh(Ct) through the output sigmoid into dz_o, and dCt = dc_in + dHt*o*(1-tanh(Ct)^2).

    dHt_cell [B,H]: dHt reaching the cell; tanh_c [B,H]: tanh of the carried cell state (used
    up as scratch); dc_in [B,H]: the dc_next share reaching the cell, (1-kc)*dc_next. Shared
    by both cells (the LayerNorm cell's dCt here is its gradient w.r.t. LN(c_new)).
    """
    np.multiply(dHt_cell, tanh_c, out=dz_o)
    dsigmoid_mul(be, dz_o, o)
    np.multiply(tanh_c, tanh_c, out=tanh_c)
    np.subtract(1.0, tanh_c, out=tanh_c)
    tanh_c *= o
    tanh_c *= dHt_cell
    np.add(dc_in, tanh_c, out=dCt)


def dz_ifg(be, dCt, i, f, g, c_prev, gmask, dz_i, dz_f, dz_g, tmp):
    """dIt = dCt*g*gmask, dCprojt = dCt*i*gmask, dFt = dCt*c_prev, each through its activation.

    Writes dz_i, dz_f, dz_g [B,H] (views of dz); tmp [B,H] is scratch. Shared by the plain and
    the LayerNorm cell, whose dCt differ but whose gates take it the same way.
    """
    np.multiply(dCt, g, out=dz_i)
    if gmask is not None:
        dz_i *= gmask
    dsigmoid_mul(be, dz_i, i)
    np.multiply(dCt, i, out=dz_g)
    if gmask is not None:
        dz_g *= gmask
    np.multiply(g, g, out=tmp)
    np.subtract(1.0, tmp, out=tmp)
    dz_g *= tmp
    np.multiply(dCt, c_prev, out=dz_f)
    dsigmoid_mul(be, dz_f, f)


def dsigmoid_mul(be, d, s):
    """d *= s * (1 - s): the sigmoid derivative written through its output s."""
    t = be.tmp("ds", s.shape, s.dtype)
    np.multiply(s, s, out=t)
    np.subtract(s, t, out=t)
    d *= t


# -- CuPy: one fused kernel launch per step (grid-stride over the B*H elements) --------------------
def cupy_forward(be, z, c_prev, h_prev, c, h, forget_bias, mask=None, zc=None, zh=None, gmask=None) -> None:
    values = locals()
    B, H4 = z.shape
    be.launch(FORWARD, "lstm_forward_step", be.grid(B * (H4 // 4)), be.BLOCK, values,
              dict(B=B, H=H4 // 4), getattr(z, "dtype", None))


def cupy_backward(be, gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                  mask=None, zc=None, zh=None, gmask=None) -> None:
    values = locals()
    B, H4 = gates.shape
    be.launch(BACKWARD, "lstm_backward_step", be.grid(B * (H4 // 4)), be.BLOCK, values,
              dict(B=B, H=H4 // 4), getattr(gates, "dtype", None))


NUMPY = {"lstm_forward_step": numpy_forward, "lstm_backward_step": numpy_backward}
CUPY = {"lstm_forward_step": cupy_forward, "lstm_backward_step": cupy_backward}
