"""The tf32/bf16 GEMM operands on the GPU, for ``CublasGemm.gemm_ex`` (cublasGemmEx).

On the CPU, tests/test_precision.py runs this code against a stand-in of nvmath's cuBLAS binding whose
gemm_ex computes the column-major contract from the very pointers, leading dimensions and
transpose flags passed (tests/support/standin.py), and the cast kernel ``f32_to_bf16`` is
compiled for sm_80/sm_90 and its host build checked against ml_dtypes.

tf32: the float32 array itself is the operand (cuBLAS rounds while it multiplies). bf16: one
launch of ``f32_to_bf16`` writes the operand's bfloat16 bits. Layout: a C-contiguous array is
used as is; an F-contiguous one (a transposed view such as U.T, x2.T) is its C-contiguous
transpose with ``Rounded.transposed`` set, which cuBLAS takes as op T (no copy).

The fused pointwise kernels still write h in float32; the next step's bf16 GEMM casts it with
one extra small launch ([B,H] elements) per step, and dz[t] likewise in BPTT, into the scratch
``SCRATCH_A`` (allocated before a CUDA-graph capture by ``CupyBackend.prepare_capture``).
Weights (U, U^T) are cast once per forward/backward call (``gemm_operand``). The one cuBLAS
path is ``cublas_gemm.CublasGemm`` (capturable); without nvmath-python these modes refuse,
naming the install, rather than multiply in float32.
"""
from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError, InputError
from ..precision import Rounded

MODES = ("tf32", "bf16")


class MixedGemm:
    """tf32/bf16 products for one CupyBackend: operand casts and layouts; the call is CublasGemm's."""

    SCRATCH_A = "gemm_bf16_a"      # the per-step left operand's bits (hs[t], dz[t])
    SCRATCH_B = "gemm_bf16_b"

    def __init__(self, backend):
        self.be = backend
        self.xp = backend.xp

    # -- operands -----------------------------------------------------------------------------
    def _check(self, name, a):
        if not isinstance(a, self.xp.ndarray):
            raise InputError(f"{name} must be a cupy array on the 'cupy' backend, got {type(a).__name__}")
        if a.dtype != np.float32:
            raise InputError(f"{name} has dtype {a.dtype}; tf32/bf16 GEMMs take float32 operands "
                             "(precision modes are for float32 models)")
        if a.ndim != 2:
            raise InputError(f"{name} must be 2-D for a tf32/bf16 GEMM, got shape {tuple(a.shape)}")

    def _layout(self, a):
        """(C-contiguous buffer holding a or a^T, transposed flag): a copy only for other layouts."""
        if a.flags.c_contiguous:
            return a, False
        if a.flags.f_contiguous:
            return a.T, True
        return self.xp.ascontiguousarray(a), False

    def cast_bf16(self, src, out):
        """out [n] uint16 = bf16(src [n] float32), both C-contiguous (one kernel launch)."""
        n = int(src.size)
        k = self.be._function("f32_to_bf16")
        k((self.be.grid(n),), (self.be.BLOCK,), (src, out, np.int64(n)))
        return out

    def operand(self, a, precision, scratch=None):
        """a as a ``Rounded`` operand: bf16 bits from one cast (into ``scratch`` when given) or, for
        tf32, the float32 array itself (cuBLAS converts while it multiplies)."""
        if isinstance(a, Rounded):
            if a.precision != precision:
                raise InputError(f"a GEMM operand rounded for {a.precision} was given to a {precision} product")
            return a
        if precision not in MODES:
            raise InputError(f"precision must be 'tf32' or 'bf16' here, got {precision!r}")
        self._check("GEMM operand", a)
        src, transposed = self._layout(a)
        if precision == "tf32":
            return Rounded(src, "tf32", transposed)
        bits = self.xp.empty(src.shape, np.uint16) if scratch is None else self.be.tmp(scratch, src.shape, np.uint16)
        return Rounded(self.cast_bf16(src, bits), "bf16", transposed)

    # -- the product ------------------------------------------------------------------------
    def gemm(self, a, b, out, precision, beta):
        """out [M,N] = a [M,K] @ b [K,N] + beta * out in ``precision`` (beta 0 or 1); returns out."""
        g = self.be._gemm()
        if g is None:
            from .cublas_gemm import INSTALL_HINT

            raise BackendUnavailableError(
                f"precision={precision!r} on the cupy backend multiplies through nvmath-python's cuBLAS "
                f"binding (cublasGemmEx), which is not usable here; {INSTALL_HINT}, or use "
                "precision='float32'")
        A = self.operand(a, precision, self.SCRATCH_A)
        Bm = self.operand(b, precision, self.SCRATCH_B)
        (M, K), (K2, N) = A.shape, Bm.shape
        if K != K2:
            raise InputError(f"GEMM shapes do not agree: {A.shape} @ {Bm.shape}")
        if out is None:
            out = self.xp.empty((M, N), np.float32)
            beta = 0.0
        self._check("out", out)
        if tuple(out.shape) != (M, N):
            raise InputError(f"out has shape {tuple(out.shape)}, expected {(M, N)}")
        target = out if out.flags.c_contiguous else self.xp.ascontiguousarray(out)
        g.gemm_ex(A, Bm, target, precision, beta)
        if target is not out:
            out[...] = target
        return out
