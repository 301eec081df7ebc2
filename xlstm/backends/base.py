"""The interface every backend implements, so the math code never branches on the device.

A backend owns an array module ``xp`` (numpy or cupy), moves arrays in and out, synchronises,
and runs the fused pointwise part of one LSTM time step, forward and backward. Everything else
(GEMMs, the time loop, layers, directions) lives in ``xlstm/lstm.py`` and is written once
against ``xp``.

Pointwise step, forward (per batch row b and unit j; gates in blocked order i, f, g, o):

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

Pointwise step, backward, with the seed article's names (dHt = dh, dCt = dc_new ...):

    dh      = mask * dy + dh_next                    # total gradient into h_t
    dh_new  = (1 - kh) * dh
    dc_new  = (1 - kc) * dc_next + dh_new * o * (1 - tanh(c_new)^2)
    dz_o    = dh_new * tanh(c_new) * o * (1 - o)
    dz_i    = dc_new * g * gmask * i * (1 - i)
    dz_g    = dc_new * i * gmask * (1 - g^2)
    dz_f    = dc_new * c_prev * f * (1 - f)
    dc_prev = kc * dc_next + dc_new * f
    dh_skip = kh * dh                                 # caller adds dz @ U^T to get dh_{t-1}
"""
from __future__ import annotations


class Backend:
    """Base class; subclasses set ``name`` and ``xp`` and implement the two pointwise steps."""

    name: str = "?"
    xp = None

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """``a`` as an array of this backend (copies across devices only when needed)."""
        raise NotImplementedError

    def to_numpy(self, a):
        """``a`` as a NumPy array on the host."""
        raise NotImplementedError

    def owns(self, a) -> bool:
        """True when ``a`` is an array of this backend's module."""
        return isinstance(a, self.xp.ndarray)

    def synchronize(self) -> None:
        """Wait until all queued device work has finished (no-op on the CPU)."""

    def __repr__(self) -> str:
        return f"<xlstm backend {self.name!r}>"

    # -- the fused pointwise LSTM step ----------------------------------------------------
    def lstm_forward_step(self, z, c_prev, h_prev, c, h, forget_bias,
                          mask=None, zc=None, zh=None, gmask=None) -> None:
        """Gate activations and state update of one time step, in place.

        z [B,4H]: in, pre-activations (input and recurrent products, bias folded in);
                  out, post-activation gates i, f, g, o (g before dropout).
        c_prev, h_prev [B,H]: state of step t-1.  c, h [B,H]: out, state of step t.
        forget_bias: float added to the forget pre-activation.
        mask [B] | None, zc [B,H] | None, zh [B,H] | None, gmask [B,H] | None: see module doc.
        """
        raise NotImplementedError

    def lstm_backward_step(self, gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                           mask=None, zc=None, zh=None, gmask=None) -> None:
        """Gate gradients of one time step (BPTT), in place.

        gates [B,4H]: post-activation i, f, g, o stored by the forward step.
        c_prev [B,H]: cell state of step t-1.
        dy [B,H]: gradient of the loss w.r.t. the step's output; dh_next, dc_next [B,H]:
                  gradients w.r.t. h_t and c_t arriving from step t+1.
        dz [B,4H]: out, gradient w.r.t. the pre-activations.
        dc_prev [B,H]: out, gradient w.r.t. c_{t-1} (may alias dc_next).
        dh_skip [B,H]: out, the part of dL/dh_{t-1} that bypasses the gates (kh * dh);
                  the caller adds dz @ U^T. May alias dh_next.
        """
        raise NotImplementedError

    # -- GEMM helpers -----------------------------------------------------------------------
    def matmul_add(self, a, b, out) -> None:
        """out += a @ b (cuBLAS beta=1 on the GPU; a product into scratch plus an add on the CPU)."""
        out += a @ b
