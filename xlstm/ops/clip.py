"""Global-norm gradient clipping of one flat buffer on the device, without a host read.

    total = sqrt(sum g^2)                 summed in float64 in a fixed order
    g *= max_norm / total                 where total is finite and > max_norm

Reference: ``xlstm.optim.clip_grad_norm`` (per-array partial sums added in the model's
order; the NumPy path, and every backend's where the gradients are not one flat buffer).
CUDA: ``grad_norm`` (one block of NORM_THREADS threads, then a fixed tree) and
``clip_by_norm`` of ``xlstm/kernels/optim.cuh``; the sum differs from NumPy's float32 partial
sums in the last bits, so NumPy has no implementation of its own here.
"""
from __future__ import annotations

from .spec import Arg, Kernel, OpSpec, Scalar

NORM_THREADS = 256     # the one block of grad_norm (xlstm::NORM_THREADS in optim.cuh)

CLIP = OpSpec(
    "clip_by_global_norm",
    args=(Arg("g", ("n",), "inout"), Scalar("max_norm", "float64")),
    kernels=(Kernel("grad_norm", ("g", "n", "total")), Kernel("clip_by_norm", ("g", "n", "total", "max_norm"))),
    scratch=(Arg("total", (), "out", dtype="float64", doc="the norm, a 0-d device array (returned)"),),
    summary="global-norm clipping of the flat gradient buffer g [n]; returns the norm")

SPECS = (CLIP,)


def cupy_clip_by_global_norm(be, g, max_norm):
    """Two launches; returns total, a new 0-d float64 device array (read at the log interval)."""
    values = locals()
    dt = getattr(g, "dtype", None)
    n = int(g.size)
    values["total"] = be.xp.empty((), "float64")
    be.launch(CLIP, "grad_norm", 1, NORM_THREADS, values, dict(n=n), dt)
    be.launch(CLIP, "clip_by_norm", be.grid(n), be.BLOCK, values, dict(n=n), dt)
    return values["total"]


NUMPY: dict = {}
CUPY = {"clip_by_global_norm": cupy_clip_by_global_norm}
