"""Softmax cross-entropy of rows of logits: the loss per row and the gradient of the mean.

    nll[r] = log sum_v exp(x[r,v] - m_r) - (x[r,t_r] - m_r)       m_r = max_v x[r,v]
    dx[r]  = (softmax(x[r]) - onehot(t_r)) / count

Reference and NumPy implementation: ``rows`` (``xlstm.losses.cross_entropy`` runs it for
masked losses too, scaling by the mask). CUDA: ``xent_row`` of ``xlstm/kernels/xent.cuh``, one
block of XENT_THREADS threads per row, its sums in a fixed order.
"""
from __future__ import annotations

import numpy as np

from .spec import Arg, Kernel, OpSpec, Scalar

XENT_THREADS = 256     # threads per row (xlstm::XENT_THREADS in xent.cuh)

XENT = OpSpec(
    "softmax_cross_entropy",
    args=(Arg("logits", ("N", "V")), Arg("targets", ("N",), dtype="int64"), Scalar("count"),
          Arg("dx", ("N", "V"), "out"), Arg("nll", ("N",), "out")),
    kernels=(Kernel("softmax_xent", ("logits", "targets", "dx", "nll", "N", "V", "count")),),
    summary="(nll [N], dx [N,V]) of logits [N,V] and targets [N]; dx is the gradient of sum(nll)/count")

SPECS = (XENT,)


def rows(xp, x2, t2):
    """(nll [N], softmax - onehot [N,V]) of logits x2 [N,V] and targets t2 [N], stable for any
    finite logits: the row max is subtracted, and the log is of a sum >= 1."""
    r = xp.arange(x2.shape[0])
    s = x2 - x2.max(axis=-1, keepdims=True)
    e = xp.exp(s)
    z = e.sum(axis=-1)
    nll = xp.log(z) - s[r, t2]                  # -log softmax at the target
    e /= z[:, None]                             # e is now the softmax
    e[r, t2] -= 1.0                             # one target per row, so no index repeats
    return nll, e


def numpy_xent(be, logits, targets, count):
    nll, e = rows(be.xp, logits, targets)
    e /= count
    return nll, e


def cupy_xent(be, logits, targets, count):
    """One launch; logits of another layout or dtype take ``rows`` (the same equations)."""
    if not (logits.flags.c_contiguous and logits.dtype.name in ("float32", "float64")):
        return numpy_xent(be, logits, targets, count)
    N, V = logits.shape
    if targets.dtype != np.int64:
        targets = targets.astype(np.int64)
    dt = logits.dtype
    values = dict(logits=logits, targets=targets, count=count, dx=be.xp.empty((N, V), dt), nll=be.xp.empty((N,), dt))
    be.launch(XENT, "softmax_xent", max(1, min(N, be.grid(N * XENT_THREADS))), XENT_THREADS, values,
              dict(N=N, V=V), dt)
    return values["nll"], values["dx"]


NUMPY = {"softmax_cross_entropy": numpy_xent}
CUPY = {"softmax_cross_entropy": cupy_xent}
