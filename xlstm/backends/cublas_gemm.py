"""cuBLAS GEMMs that CUDA stream capture can record, through NVIDIA's ``nvmath-python`` bindings.

CuPy's own cuBLAS wrappers refuse to run while a stream captures (``NotImplementedError``,
cupy issue 6290); cuBLAS itself captures fine when called through a binding that does not
refuse, with a workspace of our own (``cublasSetWorkspace``) and host-pointer alpha/beta, so
the graph holds no cuBLAS-internal allocation. ``nvmath.bindings.cublas`` (nvmath-python 1.x,
maintained by NVIDIA, thin Cython over the C API) is that binding; it is imported only here,
only when the CuPy backend first multiplies.

Row-major operands on a column-major library: C = A @ B (row-major, C [m,n]) is, read
column-major, C^T = B^T A^T, so the call is gemm(opB, opA, n, m, k, B, ldb, A, lda, C, n).
A C-contiguous operand X [r,c] is X^T column-major with ld = c (op N); an F-contiguous one
(a transposed view such as ``x2.T``) is X column-major with ld = r, so it takes op T.

The precision modes (``xlstm/precision.py``) go through the same handle with ``gemm_ex``
(cublasGemmEx), float32 accumulation and output:

    precision  operands in memory               types, compute type
    tf32       float32 (cuBLAS rounds inside)   CUDA_R_32F x2 -> CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32
    bf16       bfloat16 bits (our cast kernel)  CUDA_R_16BF x2 -> CUDA_R_32F, CUBLAS_COMPUTE_32F

On the CPU the calls are checked against a stand-in binding that computes cuBLAS's
column-major contract on the raw pointers (tests/support/standin.py).
"""
from __future__ import annotations

import numpy as np

INSTALL_HINT = ("install nvmath-python (`pip install 'xlstm-bptt[cuda13]'` or 'xlstm-bptt[cuda12]', "
                "or `pip install nvmath-python`)")


def _layout(x):
    """(cuBLAS op, leading dimension) for a row-major operand X [r,c], or None if neither layout."""
    if x.flags.c_contiguous:
        return 0, max(1, x.shape[1])          # CUBLAS_OP_N on X^T (column-major [c,r], ld c)
    if x.flags.f_contiguous:
        return 1, max(1, x.shape[0])          # CUBLAS_OP_T on X (column-major [r,c], ld r)
    return None


class CublasGemm:
    """``out += a @ b`` on one cuBLAS handle of our own, on the current cupy stream.

    a [m,k], b [k,n]: C- or F-contiguous; out [m,n]: C-contiguous; one dtype, float32 or
    float64. The handle's workspace is a ``WORKSPACE_BYTES`` device buffer owned here (cuBLAS
    resets it on every ``cublasSetStream``, so it is set again after each stream change).
    alpha = beta = 1 are host scalars, read by cuBLAS when the call is issued (or captured).
    """

    WORKSPACE_BYTES = 32 << 20     # what cuBLAS documents for Hopper; ample for sm_80

    def __init__(self, xp):
        from nvmath.bindings import cublas   # ImportError: the caller says what to install

        self._cublas, self._xp = cublas, xp
        self._handle = cublas.create()
        cublas.set_pointer_mode(self._handle, int(cublas.PointerMode.HOST))
        self._workspace = xp.empty(self.WORKSPACE_BYTES, dtype=np.uint8)
        self._stream = None
        # host alpha = beta = 1, kept alive as long as the handle (a captured GEMM read them)
        self._one = {np.dtype(np.float32): np.ones(1, np.float32), np.dtype(np.float64): np.ones(1, np.float64)}
        self._fn = {np.dtype(np.float32): cublas.sgemm, np.dtype(np.float64): cublas.dgemm}
        self._zero32 = np.zeros(1, np.float32)
        # cudaDataType values are not in the cublas binding; nvmath exports them at its top level
        import nvmath

        dt, ct = nvmath.CudaDataType, cublas.ComputeType
        self._r32f = int(dt.CUDA_R_32F)
        self._ex = {"tf32": (int(dt.CUDA_R_32F), int(ct.COMPUTE_32F_FAST_TF32)),
                    "bf16": (int(dt.CUDA_R_16BF), int(ct.COMPUTE_32F))}
        self._algo = int(cublas.GemmAlgo.DEFAULT)

    def supports(self, a, b, out) -> bool:
        """True when ``matmul_add(a, b, out)`` can run here (else the caller uses cupy)."""
        return (a.ndim == b.ndim == out.ndim == 2 and a.dtype == b.dtype == out.dtype
                and a.dtype in self._fn and out.flags.c_contiguous
                and _layout(a) is not None and _layout(b) is not None)

    def _bind_stream(self) -> None:
        s = self._xp.cuda.get_current_stream().ptr
        if s != self._stream:
            self._cublas.set_stream(self._handle, s)
            self._cublas.set_workspace(self._handle, self._workspace.data.ptr, self.WORKSPACE_BYTES)
            self._stream = s

    def matmul_add(self, a, b, out) -> None:
        """out [m,n] += a [m,k] @ b [k,n] (beta = 1; no temporary, no host sync)."""
        m, k = a.shape
        n = b.shape[1]
        if m == 0 or n == 0 or k == 0:
            return
        self._bind_stream()
        op_a, lda = _layout(a)
        op_b, ldb = _layout(b)
        one = self._one[a.dtype].ctypes.data
        self._fn[a.dtype](self._handle, op_b, op_a, n, m, k, one, b.data.ptr, ldb, a.data.ptr, lda,
                          one, out.data.ptr, max(1, n))

    def gemm_ex(self, a, b, out, precision: str, beta: float) -> None:
        """out [m,n] = a [m,k] @ b [k,n] + beta * out (beta 0 or 1) in ``precision``.

        a, b: ``xlstm.precision.Rounded`` operands (``data`` C-contiguous: float32 for tf32,
        uint16 bfloat16 bits for bf16; ``transposed`` when ``data`` holds the operand's
        transpose, which goes to cuBLAS as op T). out: C-contiguous float32.
        """
        (m, k), n = a.shape, b.shape[1]
        if m == 0 or n == 0:
            return
        if k == 0:              # cuBLAS would only scale C by beta
            if beta == 0:
                out[...] = 0
            return
        self._bind_stream()
        dtype, compute = self._ex[precision]

        def desc(R):            # (op, ld) of the column-major X^T for a row-major X [rows, cols]
            rows, cols = R.shape
            return (1, max(1, rows)) if R.transposed else (0, max(1, cols))

        op_a, lda = desc(a)
        op_b, ldb = desc(b)
        one = self._one[np.dtype(np.float32)].ctypes.data
        beta_p = one if beta else self._zero32.ctypes.data
        # C^T [n,m] = B^T [n,k] @ A^T [k,m], column-major, ldc = n
        self._cublas.gemm_ex(self._handle, op_b, op_a, n, m, k, one, b.data.data.ptr, dtype, ldb,
                             a.data.data.ptr, dtype, lda, beta_p, out.data.ptr, self._r32f, max(1, n),
                             compute, self._algo)

    def close(self) -> None:
        if self._handle is not None:
            self._cublas.destroy(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown: the library may be gone already
            pass
