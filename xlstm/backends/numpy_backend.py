"""NumPy backend: the pointwise LSTM step on the CPU, in place.

The readable reference of the same math, with the seed article's names and fresh arrays at
every line, is ``xlstm/cell.py``; tests check this in-place version against it per dtype.
Here every ufunc writes into an existing buffer (``out=``) so the time loop allocates nothing
but a few [B,H] scratch arrays that are reused across steps.
"""
from __future__ import annotations

import numpy as np

from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    xp = np

    def __init__(self):
        self._scratch: dict = {}

    def asarray(self, a, dtype=None):
        if type(a).__module__.startswith("cupy"):
            a = a.get()
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return self.asarray(a)

    def _tmp(self, key, shape, dtype):
        """A scratch buffer reused across time steps (so the loop does not allocate)."""
        k = (key, shape, np.dtype(dtype).str)
        buf = self._scratch.get(k)
        if buf is None:
            if len(self._scratch) > 64:  # many shapes seen: keep memory bounded
                self._scratch.clear()
            buf = self._scratch[k] = np.empty(shape, dtype)
        return buf

    def matmul_add(self, a, b, out) -> None:
        tmp = self._tmp("mm", out.shape, out.dtype)
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
        # sigmoid(x) = 0.5 * tanh(0.5 x) + 0.5: one tanh over all four gates, never overflows
        ifo_1 *= 0.5
        ifo_2 *= 0.5
        np.tanh(z, out=z)
        for s in (ifo_1, ifo_2):
            s *= 0.5
            s += 0.5
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
        # dOt, then dz_o = dOt * o * (1 - o)
        np.multiply(dh_new, tc, out=dz_o)
        self._dsigmoid_mul(dz_o, o)
        # dCt = dc_next + dHt * o * (1 - tanh(c)^2)
        np.multiply(tc, tc, out=tc)
        np.subtract(1.0, tc, out=tc)
        tc *= o
        tc *= dh_new
        np.add(dc_in, tc, out=dc)
        # dIt = dCt * g ;  dCprojt = dCt * i ;  dFt = dCt * c_prev
        np.multiply(dc, gd, out=dz_i)
        self._dsigmoid_mul(dz_i, i)
        np.multiply(dc, i, out=dz_g)
        if gmask is not None:
            dz_g *= gmask
        np.multiply(g, g, out=tc)
        np.subtract(1.0, tc, out=tc)
        dz_g *= tc
        np.multiply(dc, c_prev, out=dz_f)
        self._dsigmoid_mul(dz_f, f)
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

    def _dsigmoid_mul(self, d, s):
        """d *= s * (1 - s): the sigmoid derivative written through its output s."""
        t = self._tmp("ds", s.shape, s.dtype)
        np.multiply(s, s, out=t)
        np.subtract(s, t, out=t)
        d *= t

    # -- the LayerNorm LSTM step (equations in base.py) -------------------------------------
    def _ln_rows(self, v3, vhat3, rstd, eps):
        """vhat3 = (v3 - mean) * rstd over the last axis; v3, vhat3 [B,G,N], rstd [B,G] out."""
        mean = self._tmp("ln_mean", rstd.shape, rstd.dtype)
        sq = self._tmp("ln_sq", v3.shape, v3.dtype)
        np.mean(v3, axis=2, out=mean)
        np.subtract(v3, mean[:, :, None], out=vhat3)
        np.multiply(vhat3, vhat3, out=sq)
        np.mean(sq, axis=2, out=rstd)              # biased variance
        rstd += eps
        np.sqrt(rstd, out=rstd)
        np.reciprocal(rstd, out=rstd)
        vhat3 *= rstd[:, :, None]

    def _ln_rows_backward(self, d3, vhat3, rstd):
        """d3 <- rstd * (d3 - mean(d3) - vhat3 * mean(d3 * vhat3)): layer norm's dxhat -> dx."""
        m1 = self._tmp("ln_m1", rstd.shape, rstd.dtype)
        m2 = self._tmp("ln_m2", rstd.shape, rstd.dtype)
        prod = self._tmp("ln_prod", d3.shape, d3.dtype)
        np.mean(d3, axis=2, out=m1)
        np.multiply(d3, vhat3, out=prod)
        np.mean(prod, axis=2, out=m2)
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
        np.sum(a, axis=0, out=red)
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
        # dOt = dh_new * tanh(cn) ; dzn_o = dOt * o(1-o)
        np.multiply(dh_new, tc, out=dz_o)
        self._dsigmoid_mul(dz_o, o)
        # dcn = (1-kc) dc_next + dh_new * o * (1 - tanh(cn)^2)
        np.multiply(tc, tc, out=tc)
        np.subtract(1.0, tc, out=tc)
        tc *= o
        tc *= dh_new
        np.add(dc_in, tc, out=dc)
        self._acc_rows(dc_gain, dc, chat)
        self._acc_rows(dc_shift, dc)
        dc *= c_gain                               # dchat
        self._ln_rows_backward(dc[:, None, :], chat[:, None, :], rstd_c[:, None])   # dCt
        # dIt = dCt * g*gmask ; dCprojt = dCt * i*gmask ; dFt = dCt * c_prev; through the activations
        np.multiply(dc, g, out=dz_i)
        if gmask is not None:
            dz_i *= gmask
        self._dsigmoid_mul(dz_i, i)
        np.multiply(dc, i, out=dz_g)
        if gmask is not None:
            dz_g *= gmask
        np.multiply(g, g, out=tc)
        np.subtract(1.0, tc, out=tc)
        dz_g *= tc
        np.multiply(dc, c_prev, out=dz_f)
        self._dsigmoid_mul(dz_f, f)
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
