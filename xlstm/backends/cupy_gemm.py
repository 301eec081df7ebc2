"""Reduced-precision GEMMs on the GPU: cublasGemmEx, TF32 or bf16 operands, float32 accumulation.

NOT YET RUN ON A GPU: no GPU was available to the session that wrote this. On the CPU,
tests/test_precision.py runs this code against a host stand-in of cuBLAS's gemmEx (column-major,
reading the very pointers, leading dimensions and transpose flags passed here), and the cast
kernel ``f32_to_bf16`` is compiled for sm_80/sm_90 and its host build checked against
ml_dtypes. The ``gpu``-marked tests hold the device results to the NumPy emulation.

    precision  operands in memory               cublasGemmEx types, compute type
    tf32       float32 (cuBLAS rounds inside)   CUDA_R_32F x2 -> CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32
    bf16       bfloat16 (our cast kernel)       CUDA_R_16BF x2 -> CUDA_R_32F, CUBLAS_COMPUTE_32F

Layout: arrays are row-major, cuBLAS is column-major, so C [M,N] = A [M,K] @ B [K,N] is issued as
C^T = B^T A^T: a C-contiguous row-major X [r,c] is the column-major X^T with ld = c (op N);
an F-contiguous one (a transposed view such as U.T, x2.T) is the column-major X with ld = r,
so op T gives X^T without a copy. ``Rounded`` bf16 operands keep that flag in ``transposed``.

The fused pointwise kernels still write h in float32; the next step's bf16 GEMM casts it with
one extra small launch ([B,H] elements) per step, and dz[t] likewise in BPTT. Weights (U, U^T)
are cast once per forward/backward call (``gemm_operand``).
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..precision import Rounded

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h); cupy exposes the same names
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUBLAS_POINTER_MODE_HOST = 0

MODES = {"tf32": (CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32), "bf16": (CUDA_R_16BF, CUBLAS_COMPUTE_32F)}


def _cublas():
    """cupy's low-level cuBLAS bindings (gemmEx, pointer mode); a function so tests can stand in."""
    from cupy_backends.cuda.libs import cublas

    return cublas


def _ptr(a) -> int:
    """Device address of a cupy array (host address of a NumPy array in the host stand-in)."""
    data = a.data
    return data.ptr if hasattr(data, "ptr") else a.ctypes.data


class MixedGemm:
    """cublasGemmEx for one CupyBackend: operand casts, layouts, the call."""

    def __init__(self, backend):
        self.be = backend
        self.xp = backend.xp
        self._alpha = np.ones(1, np.float32)           # host scalars (CUBLAS_POINTER_MODE_HOST)
        self._beta = {0.0: np.zeros(1, np.float32), 1.0: np.ones(1, np.float32)}

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
        k((self.be._grid(n),), (self.be.BLOCK,), (src, out, np.int64(n)))
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
        bits = self.xp.empty(src.shape, np.uint16) if scratch is None else self.be._tmp(scratch, src.shape, np.uint16)
        return Rounded(self.cast_bf16(src, bits), "bf16", transposed)

    # -- the product ------------------------------------------------------------------------
    def gemm(self, a, b, out, precision, beta):
        """out [M,N] = a [M,K] @ b [K,N] + beta * out in ``precision`` (beta 0 or 1); returns out."""
        A = self.operand(a, precision, "gemm_bf16_a")
        Bm = self.operand(b, precision, "gemm_bf16_b")
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
        dtype, compute = MODES[precision]

        def desc(R):        # (op, leading dimension) of the column-major X^T for row-major X
            rows, cols = R.shape
            return (CUBLAS_OP_T, rows) if R.transposed else (CUBLAS_OP_N, cols)

        op_b, ld_b = desc(Bm)
        op_a, ld_a = desc(A)
        cublas = _cublas()
        handle = self.xp.cuda.device.get_cublas_handle()
        cublas.setStream(handle, self.xp.cuda.get_current_stream().ptr)   # the stream the kernels use
        mode = cublas.getPointerMode(handle)
        if mode != CUBLAS_POINTER_MODE_HOST:
            cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
        try:
            # C^T [N,M] = B^T [N,K] @ A^T [K,M], column-major, ldc = N
            cublas.gemmEx(handle, op_b, op_a, N, M, K, self._alpha.ctypes.data,
                          _ptr(Bm.data), dtype, ld_b, _ptr(A.data), dtype, ld_a,
                          self._beta[float(beta)].ctypes.data, _ptr(target), CUDA_R_32F, N,
                          compute, CUBLAS_GEMM_DEFAULT)
        finally:
            if mode != CUBLAS_POINTER_MODE_HOST:
                cublas.setPointerMode(handle, mode)
        if target is not out:
            out[...] = target
        return out
