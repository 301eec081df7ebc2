"""The interface every backend implements, so the math code never branches on the device.

A backend owns an array module ``xp`` (numpy or cupy), moves arrays in and out, synchronises,
and runs one layer-direction's time loop: the sequence ops ``lstm_forward_sequence``,
``lstm_backward_sequence`` and their LayerNorm twins ``ln_lstm_*_sequence``, each over all T
steps. This base class owns them as readable Python loops over the per-step ops (one recurrent
GEMM ``matmul_add`` and one fused pointwise step per time step); a backend may override them
with a faster loop (NumPy's vectorised BPTT, CuPy's captured CUDA graphs) that gives the same
result. Everything outside the loop (the input GEMM x@W for all steps, dW/dU/dx/db after BPTT,
layers, directions) lives in ``xlstm/lstm.py`` and is written once against ``xp``.

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

import contextlib


class Backend:
    """Base class; subclasses set ``name`` and ``xp`` and implement the pointwise steps (the
    sequence ops here loop over them; a subclass may override those too)."""

    name: str = "?"
    xp = None
    _force_eager = False    # True inside ``eager()``
    pending = None          # the active ``deferred()`` queue: input checks of device arrays wait there

    @contextlib.contextmanager
    def eager(self):
        """Inside the block the sequence ops run their plain per-step loop: no captured or
        replayed CUDA graph, whatever the backend's switches say (traces use this)."""
        prev, self._force_eager = self._force_eager, True
        try:
            yield self
        finally:
            self._force_eager = prev

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """``a`` as an array of this backend (copies across devices only when needed)."""
        raise NotImplementedError

    def to_numpy(self, a, copy: bool = False):
        """``a`` as a NumPy array on the host.

        On the NumPy backend this is ``a`` itself (no copy) unless ``copy=True``: a caller that
        keeps the result while the backend goes on writing into ``a`` (gradients accumulate in
        place, buffers are reused) must ask for ``copy=True``. From a device it is always a copy.
        """
        raise NotImplementedError

    def owns(self, a) -> bool:
        """True when ``a`` is an array of this backend's module."""
        return isinstance(a, self.xp.ndarray)

    def deferred(self):
        """A queue of device values and input checks read in one transfer (``backends/deferred.py``)."""
        from .deferred import DeviceReads
        return DeviceReads(self)

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

    # -- the time loop of one layer and direction (the backend seam) ---------------------------
    @staticmethod
    def _at(a, t):
        """a[t] for an optional per-step array (None stays None)."""
        return None if a is None else a[t]

    def lstm_forward_sequence(self, gates, hs, cs, U, forget_bias,
                              mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """Forward of the plain cell over all T steps, in place.

        gates [T,B,4H]: in, x@W + b of every step (the input GEMM, bias folded in);
                  out, post-activation gates i, f, g, o of every step (g before dropout).
        hs, cs [T+1,B,H]: in, the initial state in hs[0], cs[0]; out, hs[t+1], cs[t+1] the
                  (carried) state after step t.
        U [H,4H]: recurrent weights (or their ``gemm_operand`` in ``precision``).
        forget_bias: float added to the forget pre-activation.
        mask [T,B] | None: 1 inside a sequence, 0 past its end.  zc, zh, gmask [T,B,H] | None:
                  zoneout carry fractions and recurrent-dropout mask (see the module doc).
        precision: of the recurrent products (see ``matmul``).

        Per step t: gates[t] += hs[t] @ U, then one ``lstm_forward_step``.
        """
        at = self._at
        for t in range(gates.shape[0]):
            self.matmul_add(hs[t], U, gates[t], precision)     # recurrent GEMM
            self.lstm_forward_step(gates[t], cs[t], hs[t], cs[t + 1], hs[t + 1], forget_bias,
                                   at(mask, t), at(zc, t), at(zh, t), at(gmask, t))

    def lstm_backward_sequence(self, gates, cs, dy, dh, dc, dz, UT,
                               mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """BPTT of the pointwise steps and the recurrent GEMMs over all T steps, in place.

        gates [T,B,4H]: post-activation i, f, g, o of every step.  cs [T+1,B,H]: cell states
        (cs[0] the initial one).  dy [T,B,H]: gradient w.r.t. each step's output.
        dh [B,H]: in, dL/dh_T (dh_n); out, dL/dh_0 (dh0).  dc [B,H]: in, dc_n; out, dc0.
        dz [T,B,4H]: out, gradient w.r.t. the pre-activations of every step.
        UT [4H,H]: U^T (contiguous), or its ``gemm_operand`` in ``precision``.
        mask [T,B] | None; zc, zh, gmask [T,B,H] | None.  precision: of the dz @ U^T products.

        This default is the per-step loop: one ``lstm_backward_step`` and one ``matmul_add``
        per step (on the GPU: one fused kernel and one GEMM). A backend may override it to move
        the work that does not depend on the recurrence out of the loop (NumPy does).
        """
        at = self._at
        for t in reversed(range(gates.shape[0])):
            self.lstm_backward_step(gates[t], cs[t], dy[t], dh, dc, dz[t], dc, dh,
                                    at(mask, t), at(zc, t), at(zh, t), at(gmask, t))
            self.matmul_add(dz[t], UT, dh, precision)          # dh_next for step t-1

    # -- the LayerNorm LSTM step (TensorFlow LayerNormBasicLSTMCell) -------------------------
    # Layer norm of a vector v [N]: vhat = (v - mean(v)) * rstd, rstd = 1/sqrt(var(v) + eps)
    # (biased variance), LN(v) = vhat * gain + shift. Per batch row b, each of the four gate
    # blocks of z is normalised on its own (a reduction over H units), and so is c_new; on the
    # GPU one thread block per row (and gate) does the two reductions (mean, then variance).
    #
    #   zhat_k = (z_k - mean(z_k)) * rstd_k                     k in i, f, g, o
    #   i = sigmoid(zhat_i*gain_i + shift_i)   f = sigmoid(zhat_f*gain_f + shift_f + forget_bias)
    #   g = tanh(zhat_g*gain_g + shift_g)      o = sigmoid(zhat_o*gain_o + shift_o)
    #   c_new = f * c_prev + i * (g * gmask)
    #   chat  = (c_new - mean(c_new)) * rstd_c ;  cn = chat * c_gain + c_shift
    #   h_new = o * tanh(cn)
    #   c = kc * c_prev + (1 - kc) * cn ;  h = kh * h_prev + (1 - kh) * h_new   (as the plain step)
    #
    # The backward step (seed names; dxhat -> dx is layer norm's backward):
    #   dh = mask*dy + dh_next ;  dh_new = (1-kh)*dh
    #   dcn = (1-kc)*dc_next + dh_new * o * (1 - tanh(cn)^2)      gradient w.r.t. cn
    #   dc_gain += sum_b dcn*chat ;  dc_shift += sum_b dcn
    #   dCt = rstd_c * (dchat - mean(dchat) - chat*mean(dchat*chat)),  dchat = dcn * c_gain
    #   dzn_i = dCt*g*gmask*i(1-i)   dzn_f = dCt*c_prev*f(1-f)   dzn_g = dCt*i*gmask*(1-g^2)
    #   dzn_o = dh_new*tanh(cn)*o(1-o)                              gradients w.r.t. LN(z_k)
    #   dgain += sum_b dzn*zhat ;  dshift += sum_b dzn
    #   dz_k = rstd_k * (dzhat_k - mean(dzhat_k) - zhat_k*mean(dzhat_k*zhat_k)),  dzhat = dzn*gain
    #   dc_prev = kc*dc_next + dCt*f ;  dh_skip = kh*dh       (caller adds dz @ U^T to dh_skip)
    def ln_lstm_forward_step(self, z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h,
                             gain, shift, c_gain, c_shift, forget_bias, eps,
                             mask=None, zc=None, zh=None, gmask=None) -> None:
        """LayerNorm LSTM gates and state update of one time step, in place (equations above).

        z [B,4H] (C-contiguous rows): in, raw pre-activations x@W + h_prev@U (no bias);
                  out, post-activation gates i, f, g, o (g before dropout).
        zhat [B,4H]: out, normalised pre-activations (before gain/shift), for backward.
        rstd [B,4]: out, 1/sqrt(var + eps) per row and gate.
        chat [B,H]: out, normalised c_new (before c_gain/c_shift).  rstd_c [B]: out.
        c_prev, h_prev [B,H]: the state of step t-1.  c, h [B,H]: out, the state of step t.
        gain, shift [4H] (blocked i, f, g, o); c_gain, c_shift [H]; forget_bias, eps: floats.
        mask [B] | None, zc, zh, gmask [B,H] | None: as ``lstm_forward_step``.
        """
        raise NotImplementedError(f"backend {self.name!r} has no LayerNorm LSTM step (ln_lstm_forward_step)")

    def ln_lstm_backward_step(self, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift,
                              dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                              dgain, dshift, dc_gain, dc_shift,
                              mask=None, zc=None, zh=None, gmask=None) -> None:
        """Gradients of one LayerNorm LSTM step (BPTT), in place (equations above).

        gates [B,4H], zhat [B,4H], rstd [B,4], chat [B,H], rstd_c [B]: stored by the forward step.
        c_prev [B,H]: the (carried) cell state of step t-1.  gain [4H], c_gain, c_shift [H].
        dy [B,H]; dh_next, dc_next [B,H]: gradients w.r.t. h_t and c_t from step t+1.
        dz [B,4H]: out, gradient w.r.t. the raw pre-activations z (feeds dW, dU, dx).
        dc_prev [B,H]: out (may alias dc_next).  dh_skip [B,H]: out, kh*dh (may alias dh_next).
        dgain, dshift [4H], dc_gain, dc_shift [H]: accumulated (+=) over the batch rows.
        """
        raise NotImplementedError(f"backend {self.name!r} has no LayerNorm LSTM step (ln_lstm_backward_step)")

    def ln_lstm_forward_sequence(self, gates, zhat, rstd, chat, rstd_c, hs, cs, U,
                                 gain, shift, c_gain, c_shift, forget_bias, eps,
                                 mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """Forward of the LayerNorm cell over all T steps, in place (equations above).

        gates [T,B,4H]: in, x@W of every step (no bias: the cell has none);
                  out, post-activation gates i, f, g, o of every step (g before dropout).
        zhat [T,B,4H], rstd [T,B,4], chat [T,B,H], rstd_c [T,B]: out, what backward needs
                  (normalised pre-activations and cell states, their 1/sqrt(var + eps)).
        hs, cs [T+1,B,H]: in, the initial state in [0]; out, the state after every step.
        U [H,4H] (or its ``gemm_operand``); gain, shift [4H] (blocked i, f, g, o); c_gain,
        c_shift [H]; forget_bias, eps: floats.  mask [T,B] | None; zc, zh, gmask [T,B,H] | None.
        precision: of the recurrent products.

        Per step t: gates[t] += hs[t] @ U, then one ``ln_lstm_forward_step``.
        """
        at = self._at
        for t in range(gates.shape[0]):
            self.matmul_add(hs[t], U, gates[t], precision)     # recurrent GEMM
            self.ln_lstm_forward_step(gates[t], zhat[t], rstd[t], chat[t], rstd_c[t], cs[t], hs[t],
                                      cs[t + 1], hs[t + 1], gain, shift, c_gain, c_shift,
                                      forget_bias, eps, at(mask, t), at(zc, t), at(zh, t), at(gmask, t))

    def ln_lstm_backward_sequence(self, gates, zhat, rstd, chat, rstd_c, cs, gain, c_gain, c_shift,
                                  dy, dh, dc, dz, UT, dgain, dshift, dc_gain, dc_shift,
                                  mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """BPTT of the LayerNorm cell over all T steps, in place (equations above).

        gates, zhat [T,B,4H], rstd [T,B,4], chat [T,B,H], rstd_c [T,B]: stored by the forward.
        cs [T+1,B,H]: cell states (cs[0] the initial one).  gain [4H]; c_gain, c_shift [H].
        dy [T,B,H]: gradient w.r.t. each step's output.
        dh [B,H]: in, dL/dh_T; out, dL/dh_0.  dc [B,H]: in, dL/dc_T; out, dL/dc_0.
        dz [T,B,4H]: out, gradient w.r.t. the raw pre-activations of every step.
        UT [4H,H]: U^T (contiguous), or its ``gemm_operand`` in ``precision``.
        dgain, dshift [4H], dc_gain, dc_shift [H]: accumulated (+=).
        mask [T,B] | None; zc, zh, gmask [T,B,H] | None.  precision: of the dz @ U^T products.

        Per step t (backwards): one ``ln_lstm_backward_step``, then dh += dz[t] @ U^T.
        """
        at = self._at
        for t in reversed(range(gates.shape[0])):
            self.ln_lstm_backward_step(gates[t], zhat[t], rstd[t], chat[t], rstd_c[t], cs[t],
                                       gain, c_gain, c_shift, dy[t], dh, dc, dz[t], dc, dh,
                                       dgain, dshift, dc_gain, dc_shift,
                                       at(mask, t), at(zc, t), at(zh, t), at(gmask, t))
            self.matmul_add(dz[t], UT, dh, precision)          # dh_next for step t-1

    # -- GEMMs (the only place precision modes act; see xlstm/precision.py) ---------------------
    # a, b: 2-D arrays of this backend (views such as U.T allowed), or ``Rounded`` operands from
    # ``gemm_operand``; out and every result are float32/float64 arrays; precision 'float32'
    # (exact in the array dtype), 'tf32' or 'bf16' (operands rounded, float32 accumulation).
    def gemm_operand(self, a, precision: str = "float32"):
        """``a`` prepared once for many products in ``precision`` (a weight inside a time loop).

        float32: ``a`` itself. Otherwise a ``xlstm.precision.Rounded`` that ``matmul`` and
        ``matmul_add`` use without rounding it again.
        """
        if precision == "float32":
            return a
        raise NotImplementedError(f"backend {self.name!r} has no {precision} GEMM")

    def matmul(self, a, b, out=None, precision: str = "float32"):
        """a [M,K] @ b [K,N] (into out [M,N] when given; returned)."""
        if precision == "float32":
            return self.xp.matmul(a, b, out=out)
        raise NotImplementedError(f"backend {self.name!r} has no {precision} GEMM")

    def matmul_add(self, a, b, out, precision: str = "float32") -> None:
        """out [M,N] += a [M,K] @ b [K,N] (cuBLAS beta=1 on the GPU; a product into scratch plus
        an add on the CPU)."""
        if precision == "float32":
            out += a @ b
            return
        out += self.matmul(a, b, precision=precision)
