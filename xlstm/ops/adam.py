"""One Adam/AdamW update of flat buffers, element by element.

    p = p * decay                        (decay = 1 - lr * wd for AdamW, else 1)
    m = m * b1 + g * c1                  (c1 = 1 - b1)
    v = v * b2 + g * g * c2              (c2 = 1 - b2)
    p = p - m / (sqrt(v) / bc2 + eps) * step     (bc2 = sqrt(1 - b2^t), step = lr / (1 - b1^t))

Reference and NumPy implementation: ``passes`` (one elementwise pass per operation, in this
order; it runs on any array module, and ``xlstm.optim.Adam`` uses it tensor by tensor where the
buffers are not flat). CUDA: ``adam_at`` of ``xlstm/kernels/optim.cuh``, one launch over the
flat buffers, each operation rounded as the passes round it, so both give the same bits.
"""
from __future__ import annotations

from .spec import Arg, Kernel, OpSpec, Scalar

SCALARS = ("decay", "b1", "c1", "b2", "c2", "bc2", "eps", "step")

ADAM = OpSpec(
    "adam_step",
    args=(Arg("p", ("n",), "inout"), Arg("g", ("n",)), Arg("m", ("n",), "inout"), Arg("v", ("n",), "inout"))
    + tuple(Scalar(s) for s in SCALARS),
    kernels=(Kernel("adam_step", ("p", "g", "m", "v") + SCALARS + ("n",)),),
    summary="one Adam/AdamW update of the flat buffers p, g, m, v [n]")

SPECS = (ADAM,)


def moments(xp, m, v, g, d, b1, c1, b2, c2, bc2, eps, step):
    """m, v updated in place; d (scratch like g) becomes the step with p -= d."""
    m *= b1
    xp.multiply(g, c1, out=d)
    m += d
    v *= b2
    xp.multiply(g, g, out=d)
    d *= c2
    v += d
    xp.sqrt(v, out=d)
    d /= bc2
    d += eps
    xp.divide(m, d, out=d)
    d *= step
    return d


def passes(be, p, g, m, v, decay, b1, c1, b2, c2, bc2, eps, step) -> None:
    """The update as one elementwise pass per operation, on ``be.xp`` arrays."""
    if decay != 1.0:
        p *= decay
    p -= moments(be.xp, m, v, g, be.tmp("adam_d", g.shape, g.dtype), b1, c1, b2, c2, bc2, eps, step)


def cupy_adam_step(be, p, g, m, v, decay, b1, c1, b2, c2, bc2, eps, step) -> None:
    """The update in one kernel launch (``kernels/optim.cuh``)."""
    values = locals()
    n = int(p.size)
    be.launch(ADAM, "adam_step", be.grid(n), be.BLOCK, values, dict(n=n), getattr(p, "dtype", None))


NUMPY = {"adam_step": passes}
CUPY = {"adam_step": cupy_adam_step}
