"""GEMM precision modes: float32 (exact), tf32 and bf16 operands with float32 accumulation.

    LSTM(..., precision="bf16"); Dense(..., precision="tf32"); model.precision = "float32"

A mode changes only the INPUTS of the matrix products (x@W, h@U, dz@U^T, X^T dZ, H^T dZ,
dZ W^T, and Dense's): each operand is rounded to the mode's format, the products are summed
in float32, the result is float32. The cell state, all pointwise math, the gradient
accumulation (``grads`` += float32 products) and the optimiser's master weights stay float32.
This is what ``torch.autocast(dtype=torch.bfloat16)`` does to cuDNN's LSTM, and what
cuBLAS's TF32 math mode does to a float32 GEMM.

    mode      operand format                  unit roundoff u (round to nearest)
    float32   float32 (24-bit significand)    2^-24
    tf32      TF32 (8-bit exp, 11-bit sig.)   2^-11   (2^-10 if the hardware truncates)
    bf16      bfloat16 (8-bit exp, 8-bit sig.) 2^-8

Error model of one product c = sum_k a_k b_k (K terms) with rounded operands
a'_k = a_k (1 + e), |e| <= u, and float32 summation (unit 2^-24):

    |c' - c| <= (2u + u^2 + K 2^-24 (1 + 2u)) * sum_k |a_k b_k|

so for a product without heavy cancellation the relative error is about 2u (bf16: 2^-7 =
0.8%, tf32: 2^-10 = 0.1%) in the worst case and ~u/sqrt(K) typically (random signs). Through
an LSTM the errors of all steps and layers compound; the measured forward/backward errors
against float64 are in the README (``xlstm/precision_error.py`` measures them) and bounded in
tests/test_precision.py.

Rounding (what the emulation here does, and what the GPU does):
- bf16: round to nearest, ties to even, as ``ml_dtypes.bfloat16`` and CUDA's
  ``__float2bfloat16_rn``; the CuPy backend casts with its own kernel (``f32_to_bf16`` in
  ``xlstm/kernels/precision.cuh``, same bits), then calls cublasGemmEx on bf16 operands with
  CUBLAS_COMPUTE_32F.
- tf32: cuBLAS (CUBLAS_COMPUTE_32F_FAST_TF32) takes float32 memory and converts inside its
  kernels; NVIDIA does not document that conversion's rounding. PyTorch's numerical-accuracy
  note says "only the first 10 bits of the input mantissa are read" (truncation), while
  PTX's explicit conversion ``cvt.rna.tf32.f32`` rounds to nearest, ties away from zero.
  ``round_tf32`` therefore offers ``"rne"`` (the default: the emulation's mode, half the error)
  and ``"rz"`` (truncation); the bounds in the tests allow the truncation error, and
  ``tests/test_precision.py::test_gpu_tf32_rounding`` finds out, on a GPU, which one cuBLAS
  applies (a product with the identity returns the rounded operand exactly).

The NumPy backend EMULATES the modes: it rounds the operands (bit operations below), then
multiplies in float32 with NumPy's BLAS. That is slower than float32 (a few extra passes per
product), never faster, and its summation order differs from cuBLAS's (which is fine: the
bound, not the bits, is the contract). It warns once per process that it emulates.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

MODES = ("float32", "tf32", "bf16")
# significand bits of float32 (23 stored) dropped by each mode
DROPPED_BITS = {"float32": 0, "tf32": 13, "bf16": 16}
# unit roundoff of the operands (round to nearest)
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "tf32": 2.0 ** -11, "bf16": 2.0 ** -8}


class PrecisionEmulationWarning(UserWarning):
    """A reduced-precision mode runs as an emulation (NumPy): same numbers as the GPU mode within
    the error bound, but slower than float32, not faster."""


def check_precision(precision, dtype="float32") -> str:
    """The mode name for ``precision`` ('float32' | 'tf32' | 'bf16'); InputError when unknown or
    when a reduced mode is asked of a float64 model (it would silently throw away precision
    the user asked for by choosing float64)."""
    if precision is None:
        return "float32"
    if not isinstance(precision, str) or precision.lower() not in MODES:
        raise InputError(f"precision must be one of {MODES}, got {precision!r}")
    p = precision.lower()
    dt = np.dtype(dtype)
    if p != "float32" and dt != np.float32:
        raise InputError(f"precision={p!r} needs a float32 model (its GEMM operands are rounded from float32, "
                         f"accumulated in float32), but this one is {dt.name}; use dtype='float32' "
                         f"with precision={p!r}, or precision='float32' with dtype={dt.name!r}")
    return p


def _round_bits(x, drop: int, mode: str, out=None):
    """x float32 with the low ``drop`` significand bits cleared: rounded to nearest-even ('rne')
    or truncated toward zero ('rz'). Inf stays Inf; a finite value that rounds past the largest
    one becomes Inf (IEEE); NaN stays a (quiet) NaN."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise InputError(f"rounding to a GEMM precision takes float32 arrays, got {x.dtype}")
    if mode not in ("rne", "rz"):
        raise InputError(f"rounding mode must be 'rne' or 'rz', got {mode!r}")
    xc = np.ascontiguousarray(x)
    u = xc.view(np.uint32)
    keep = np.uint32((0xFFFFFFFF << drop) & 0xFFFFFFFF)
    if out is None:
        out = np.empty(x.shape, np.float32)
    r = out.view(np.uint32)
    if mode == "rne":
        # add half an ulp of the kept part, minus one unless the kept part is odd: ties go to even;
        # a carry out of the significand moves the exponent up, which is the correct rounding
        np.right_shift(u, np.uint32(drop), out=r)
        r &= np.uint32(1)
        r += np.uint32((1 << (drop - 1)) - 1)
        r += u
        r &= keep
    else:
        np.bitwise_and(u, keep, out=r)
    nan = np.isnan(xc)
    if nan.any():      # the add above would carry NaN payloads into the sign bit
        r[nan] = (u[nan] | np.uint32(0x00400000)) & keep
    return out


def round_bf16(x, out=None):
    """x [any] float32 -> float32 holding the nearest bfloat16 (ties to even), as ml_dtypes."""
    return _round_bits(x, 16, "rne", out)


def round_tf32(x, mode: str = "rne", out=None):
    """x [any] float32 -> float32 holding a TF32 value (10 stored significand bits).

    mode 'rne': nearest, ties to even (the emulation's default); 'rz': truncation (what
    PyTorch's note says the tensor cores read). See the module doc."""
    return _round_bits(x, 13, mode, out)


def round_operand(x, precision: str, out=None):
    """x rounded to the operand format of ``precision`` (float32: x itself, no copy)."""
    if precision == "float32":
        return x
    if precision == "bf16":
        return round_bf16(x, out)
    if precision == "tf32":
        return round_tf32(x, "rne", out)
    raise InputError(f"precision must be one of {MODES}, got {precision!r}")


class Rounded:
    """A GEMM operand already rounded to ``precision`` (so a loop rounds a weight once, not per step).

    ``data``: the backend's array in the operand format (NumPy: float32 values on the format's
    grid; CuPy bf16: uint16 bfloat16 bits); ``shape`` its logical 2-D shape; ``transposed``:
    True when ``data`` is the C-contiguous transpose of the operand (``U.T`` without a copy).
    """

    __slots__ = ("data", "precision", "shape", "transposed")

    def __init__(self, data, precision: str, transposed: bool = False):
        self.data, self.precision, self.transposed = data, precision, bool(transposed)
        s = tuple(data.shape)
        self.shape = s[::-1] if transposed else s

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Rounded({self.precision}, shape={self.shape}{', transposed' if self.transposed else ''})"

