"""Softmax and softmax cross-entropy, stable for any finite logits.

softmax(x)_v      = exp(x_v - m) / sum_u exp(x_u - m),   m = max_u x_u
log_softmax(x)_v  = (x_v - m) - log sum_u exp(x_u - m)   (log-sum-exp: never log(0), never exp overflow)
cross-entropy     = -log_softmax(x)_target, averaged over the unmasked positions
d mean / d logits = (softmax - onehot(target)) * mask / count
"""
from __future__ import annotations

import numpy as np

from . import backends
from .checks import as_array, check_range
from .errors import InputError
from .ops import softmax_xent


def _logits(logits, name: str = "logits"):
    """``logits`` as a float array on its own backend (NumPy for lists), with its xp."""
    backend = backends.backend_of(logits)
    a = as_array(backend, logits, name)
    if a.dtype.kind in "iub":
        a = a.astype(np.float64)
    elif a.dtype.kind != "f":
        raise InputError(f"{name} must be a real floating-point array, got dtype {a.dtype}")
    if a.ndim < 1 or a.shape[-1] < 1:
        raise InputError(f"{name} must have at least one axis with at least one class, got shape {tuple(a.shape)}")
    return backend, a


def _shifted(x, axis):
    """x - max(x) along ``axis``: every value <= 0, so exp cannot overflow."""
    return x - x.max(axis=axis, keepdims=True)


def softmax(logits, axis: int = -1):
    """Softmax along ``axis`` (same shape as ``logits``)."""
    backend, x = _logits(logits)
    xp = backend.xp
    e = xp.exp(_shifted(x, axis))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(logits, axis: int = -1):
    """log softmax along ``axis``, by log-sum-exp (same shape as ``logits``)."""
    backend, x = _logits(logits)
    xp = backend.xp
    s = _shifted(x, axis)
    # the sum is >= 1 (the max term is exp(0)), so its log is finite
    s -= xp.log(xp.exp(s).sum(axis=axis, keepdims=True))
    return s


def cross_entropy(logits, targets, mask=None, on_device: bool = False):
    """Mean softmax cross-entropy and its gradient.

    logits [..., V] float; targets [...] integers in [0, V); mask [...] of 0/1 or bool (None: all 1).
    Returns (loss, dlogits): loss = sum(mask * -log_softmax(logits)[target]) / sum(mask), a float;
    dlogits [..., V] = (softmax(logits) - onehot(targets)) * mask / sum(mask).
    on_device: the loss stays a 0-d float64 array of the logits' backend (the same value, bit
    for bit), so nothing waits for the device; read it with float() when needed (without a mask).
    Without a mask it is the backend's ``softmax_cross_entropy`` op (``xlstm.ops.softmax_xent``;
    on CuPy one kernel, kernels/xent.cuh: the same equations, its sums in a fixed order).
    """
    backend, x = _logits(logits)
    xp = backend.xp
    V = x.shape[-1]
    lead = tuple(x.shape[:-1])
    host = targets if isinstance(targets, np.ndarray) else None     # host targets: range checked there
    t = as_array(backend, targets, "targets", shape=lead, dims=f"(logits.shape[:-1] = {lead})")
    if t.dtype.kind not in "iu":
        raise InputError(f"targets must be an integer array of class ids, got dtype {t.dtype}")
    check_range(backend, t if host is None else host, "targets", 0, V,
                "the number of classes, logits.shape[-1]")
    if mask is None:
        m = None
        count = int(np.prod(lead, dtype=np.int64))
        if count == 0:
            raise InputError("logits has no positions (an empty batch); the mean is undefined")
    else:
        m = as_array(backend, mask, "mask", shape=lead, dims=f"(logits.shape[:-1] = {lead})")
        if m.dtype.kind not in "biuf":
            raise InputError(f"mask must be bool or numeric 0/1, got dtype {m.dtype}")
        m = m.astype(x.dtype)
        if m.size and not bool(((m == 0) | (m == 1)).all()):
            raise InputError("mask must contain only 0 and 1 (or True/False)")
        count = float(m.sum())
        if count == 0:
            raise InputError("mask has no nonzero entries; the mean cross-entropy over zero positions is undefined")

    x2 = x.reshape(-1, V)
    t2 = t.reshape(-1)
    if m is None:
        # the backend's op (xlstm.ops.softmax_xent; on CuPy one kernel, its sums in a fixed order)
        nll, e = backend.softmax_cross_entropy(x2, t2, count)
        # float64 of the sum, then / count in float64: what float(...) / count computes on the host
        loss = nll.sum().astype(np.float64) / count if on_device else float(nll.sum()) / count
        return loss, e.reshape(x.shape)
    nll, e = softmax_xent.rows(xp, x2, t2)
    m2 = m.reshape(-1)
    loss = float((nll * m2).sum()) / count
    e *= (m2 / count)[:, None]
    return loss, e.reshape(x.shape)

