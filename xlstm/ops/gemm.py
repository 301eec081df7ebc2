"""The GEMMs: ``matmul`` (a @ b), ``matmul_add`` (out += a @ b) and ``gemm_operand`` (a weight
prepared once for many products), in precision float32, tf32 or bf16 (``xlstm/precision.py``).

a, b: 2-D arrays of the backend (views such as U.T allowed), or ``Rounded`` operands from
``gemm_operand``; out and every result are float32/float64 arrays. 'float32' multiplies exactly
in the array dtype; 'tf32'/'bf16' round the operands to that format and accumulate in float32.

Reference: ``xlstm.precision.round_operand`` then a float32 product (what the NumPy
implementation does: an EMULATION, slower than float32). CuPy: cuBLAS, through nvmath-python's
binding (``xlstm/backends/cublas_gemm.py``, capturable into a CUDA graph) with beta = 1 for
``matmul_add``; tf32/bf16 through cublasGemmEx with operands prepared by
``xlstm/backends/cupy_gemm.py`` (the bf16 cast is the kernel ``f32_to_bf16``).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..precision import PrecisionEmulationWarning, Rounded, round_operand
from .spec import Arg, Kernel, OpSpec, Scalar

MATMUL_ADD = OpSpec(
    "matmul_add",
    args=(Arg("a", ("M", "K")), Arg("b", ("K", "N")), Arg("out", ("M", "N"), "acc"), Scalar("precision", "str")),
    kernels=(Kernel("f32_to_bf16", typed=False),),     # launched by backends/cupy_gemm.py (bf16 operands)
    summary="out += a @ b")

MATMUL = OpSpec(
    "matmul",
    args=(Arg("a", ("M", "K")), Arg("b", ("K", "N")), Arg("out", ("M", "N"), "out", optional=True),
          Scalar("precision", "str")),
    summary="a @ b (into out when given; returned)")

GEMM_OPERAND = OpSpec(
    "gemm_operand",
    args=(Arg("a", ("M", "K")), Scalar("precision", "str")),
    summary="a prepared once for many products in precision: itself (float32) or a Rounded operand")

SPECS = (MATMUL_ADD, MATMUL, GEMM_OPERAND)

_WARNED: set = set()


def _warn_emulation(precision: str) -> None:
    """Once per process and mode: the NumPy backend emulates reduced precision, slowly."""
    if precision in _WARNED:
        return
    _WARNED.add(precision)
    import warnings

    warnings.warn(f"precision={precision!r} on the numpy backend is an EMULATION: GEMM operands are rounded to "
                  f"{precision} and multiplied in float32, giving the GPU mode's numbers within its error bound, "
                  "but SLOWER than float32 (extra rounding passes), not faster. Use the cupy backend for speed.",
                  PrecisionEmulationWarning, stacklevel=3)


# -- NumPy: float32 as is; tf32/bf16 EMULATED (operands rounded, then a float32 GEMM) --------------
def numpy_gemm_operand(be, a, precision="float32"):
    if precision == "float32":
        return a
    _warn_emulation(precision)
    return Rounded(round_operand(np.asarray(a), precision), precision)


def numpy_operand(be, a, precision, key):
    """``a`` as the float32 array the emulated product multiplies (rounded unless it is already)."""
    if isinstance(a, Rounded):
        if a.precision != precision:
            raise InputError(f"a GEMM operand rounded for {a.precision} was given to a {precision} product")
        return a.data.T if a.transposed else a.data
    if precision == "float32":
        return a
    _warn_emulation(precision)
    return round_operand(a, precision, out=be.tmp(key, a.shape, np.float32))


def numpy_matmul(be, a, b, out=None, precision="float32"):
    return np.matmul(numpy_operand(be, a, precision, "gemm_a"), numpy_operand(be, b, precision, "gemm_b"), out=out)


def numpy_matmul_add(be, a, b, out, precision="float32") -> None:
    a, b = numpy_operand(be, a, precision, "gemm_a"), numpy_operand(be, b, precision, "gemm_b")
    tmp = be.tmp("mm", out.shape, out.dtype)
    with be.gemm_threads(a.shape[0] * a.shape[1] * b.shape[1]):
        np.matmul(a, b, out=tmp)
    out += tmp


# -- CuPy: cuBLAS ---------------------------------------------------------------------------------
def cupy_gemm_operand(be, a, precision="float32"):
    if precision == "float32":
        return a
    return be.mixed_gemm().operand(a, precision)


def cupy_matmul(be, a, b, out=None, precision="float32"):
    if precision == "float32":
        return be.xp.matmul(a, b, out=out)
    return be.mixed_gemm().gemm(a, b, out, precision, beta=0.0)


def cupy_matmul_add(be, a, b, out, precision="float32") -> None:
    """out += a @ b as one cuBLAS gemm with beta = 1 (no temporary, no host sync).

    Through ``CublasGemm`` (nvmath's binding, capturable) where nvmath-python is installed,
    else cupy's cuBLAS. Transposed views (``U.T``, ``x2.T``) go to cuBLAS as transpose flags,
    not copies. Other layouts are copied by cupy first; other ranks or mixed dtypes fall back
    to ``out += a @ b``. tf32/bf16: ``CublasGemm.gemm_ex`` with beta = 1 (``cupy_gemm.py``);
    these need nvmath-python and say so without it.
    """
    if precision != "float32":
        be.mixed_gemm().gemm(a, b, out, precision, beta=1.0)
        return
    if a.ndim == 2 and b.ndim == 2 and out.ndim == 2 and a.dtype == b.dtype == out.dtype \
            and a.dtype.char in "fd":
        g = be._gemm()
        if g is not None and g.supports(a, b, out):
            g.matmul_add(a, b, out)
            return
        be.cupy_gemm_add(a, b, out)
    else:
        out += a @ b


NUMPY = {"gemm_operand": numpy_gemm_operand, "matmul": numpy_matmul, "matmul_add": numpy_matmul_add}
CUPY = {"gemm_operand": cupy_gemm_operand, "matmul": cupy_matmul, "matmul_add": cupy_matmul_add}
