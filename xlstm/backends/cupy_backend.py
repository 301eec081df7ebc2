"""CuPy backend: the same pointwise LSTM step as fused CUDA kernels (``xlstm/kernels``).

This is the only module (with its package) that imports cupy, and it does so lazily, so
``import xlstm`` works on machines without cupy or without a GPU.

How the CUDA path is built: ``xlstm/kernels/lstm_kernels.cu`` (with its header
``lstm_pointwise.cuh`` pasted in by ``xlstm.kernels.kernel_source``) is compiled at run time by
NVRTC through ``cupy.RawModule``, once per device and process (cupy also caches the binary on
disk, keyed by the source text). Per time step the layer then issues one cuBLAS GEMM
(``matmul_add``, beta = 1) and one fused kernel launch (the LayerNorm step's backward: two, the
second adding the rows' gain/shift gradients); nothing waits for the device inside the time
loop, and the only buffer a step needs (the LayerNorm backward's [B,10H] partial sums) is
allocated once per shape and reused.

CUDA graphs are not used: the layer's time loop is Python that launches a GEMM and a kernel per
step, and capturing it would need the loop itself to be graph-aware. ``CupyBackend`` has no
graph switch for that reason; the launch overhead per step is two launches.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import InputError
from .base import Backend


def _nvidia_driver_present() -> bool:
    """True when the kernel driver or libcuda is visible (Linux and Windows)."""
    import ctypes.util
    import os

    return os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None \
        or ctypes.util.find_library("nvcuda") is not None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why CuPy cannot run here (cupy missing / no device / driver too old), or None."""
    try:
        import cupy
    except ImportError as e:
        return (f"cupy is not installed ({e}); install it with "
                "`pip install 'xlstm[cuda12]'` or `pip install 'xlstm[cuda13]'` to match your CUDA driver")
    except Exception as e:  # a broken install raises other errors on import
        return f"cupy failed to import ({type(e).__name__}: {e}); reinstall the cupy wheel matching your CUDA"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        msg = str(e)
        if not _nvidia_driver_present():
            return (f"no NVIDIA GPU driver on this machine ({type(e).__name__}: {msg}); "
                    "CuPy needs an NVIDIA GPU and its driver")
        if "insufficient" in msg.lower() or "driver" in msg.lower():
            return (f"the NVIDIA driver is too old or missing for this cupy build ({msg}); "
                    "update the driver or install the cupy wheel for your CUDA version")
        return f"no usable CUDA device ({type(e).__name__}: {msg})"
    if n < 1:
        return "no CUDA device found (cupy sees 0 devices)"
    try:
        cupy.zeros(1).sum().item()   # compiles a reduction with NVRTC, so this also finds NVRTC
    except Exception as e:
        return f"a CUDA device exists but cannot run work ({type(e).__name__}: {e})"
    try:
        import cupy.cublas  # noqa: F401  (matmul_add's GEMMs; cupy loads libcublas lazily)
    except Exception as e:
        return (f"cuBLAS cannot be loaded ({type(e).__name__}: {e}); install the CUDA toolkit's "
                "libraries, e.g. `pip install 'cupy-cuda13x[ctk]'` (or cupy-cuda12x[ctk])")
    return None


class CupyBackend(Backend):
    """Fused CUDA kernels for the pointwise steps, cuBLAS for ``matmul_add``.

    Arrays handed to the steps must be cupy arrays of one dtype (float32 or float64), C-contiguous
    (the layer passes ``gates[t]``-style views of contiguous [T,B,...] buffers, which are), on
    the current device; anything else raises :class:`xlstm.errors.InputError` naming the argument.
    """

    name = "cupy"
    BLOCK = 256            # threads per block of the elementwise kernels (grid-stride loops)
    WAVES = 8              # cap on the elementwise grid: blocks per SM (more only adds blocks
                           # that the grid-stride loop makes unnecessary)

    def __init__(self):
        import cupy

        self.xp = cupy
        self._modules: dict = {}      # device id -> cupy.RawModule
        self._kernels: dict = {}      # (device id, kernel name) -> cupy.RawKernel
        self._sm_count: dict = {}     # device id -> number of SMs
        self._scratch: dict = {}      # (key, shape, dtype) -> cupy array, reused across steps
        self._null = np.uint64(0)     # a NULL pointer argument: 8 zero bytes, as a T* parameter
        #                               (cupy passes None as 0xffffffff, not NULL: cupy#9046)

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return self.xp.asnumpy(a)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    # -- kernels ----------------------------------------------------------------------------
    def _kernel(self, name: str, dtype):
        """The compiled kernel ``{name}_{f32|f64}`` on the current device (compiled once)."""
        from ..kernels import DTYPE_SUFFIX

        sfx = DTYPE_SUFFIX.get(np.dtype(dtype).name)
        if sfx is None:
            raise InputError(f"the cupy backend's kernels take float32 or float64 arrays, got {np.dtype(dtype)}")
        return self._function(f"{name}_{sfx}")

    def _function(self, full_name: str):
        """The compiled kernel ``full_name`` of lstm_kernels.cu on the current device (compiled once)."""
        from ..kernels import kernel_source

        dev = self.xp.cuda.runtime.getDevice()
        key = (dev, full_name)
        k = self._kernels.get(key)
        if k is None:
            mod = self._modules.get(dev)
            if mod is None:
                # no -use_fast_math: tanh must stay the accurate one (the tests' tolerances)
                mod = self._modules[dev] = self.xp.RawModule(code=kernel_source(), options=("-std=c++17",))
            k = self._kernels[key] = mod.get_function(full_name)
        return k

    def _grid(self, n: int) -> int:
        """Blocks for n elements at BLOCK threads each, capped at WAVES blocks per SM."""
        dev = self.xp.cuda.runtime.getDevice()
        sms = self._sm_count.get(dev)
        if sms is None:
            sms = self._sm_count[dev] = self.xp.cuda.Device(dev).attributes["MultiProcessorCount"]
        return max(1, min((n + self.BLOCK - 1) // self.BLOCK, sms * self.WAVES))

    @staticmethod
    def _row_block(H: int) -> int:
        """Threads per row block of the LayerNorm kernels: a multiple of 32, about H, <= 256."""
        return min(256, max(32, (H + 31) // 32 * 32))

    def _tmp(self, key, shape, dtype):
        """A device scratch buffer reused across time steps (so the loop does not allocate)."""
        k = (key, shape, np.dtype(dtype).str, self.xp.cuda.runtime.getDevice())
        buf = self._scratch.get(k)
        if buf is None:
            if len(self._scratch) > 64:  # many shapes seen: keep memory bounded
                self._scratch.clear()
            buf = self._scratch[k] = self.xp.empty(shape, dtype)
        return buf

    def _arg(self, name, a, shape, dtype, optional=False):
        """Checks one kernel argument; returns it, or a NULL pointer for an absent optional one."""
        if a is None:
            if optional:
                return self._null
            raise InputError(f"{name} is required")
        if not isinstance(a, self.xp.ndarray):
            raise InputError(f"{name} must be a cupy array on the 'cupy' backend, got {type(a).__name__}; "
                             "move it with backend.asarray(...)")
        if a.dtype != dtype:
            raise InputError(f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)} like the other arguments")
        if a.shape != shape:
            raise InputError(f"{name} has shape {tuple(a.shape)}, expected {shape}")
        if not a.flags.c_contiguous:
            raise InputError(f"{name} must be C-contiguous (strides {a.strides}); "
                             "pass a slice of a contiguous buffer or cupy.ascontiguousarray(...)")
        return a

    # -- the fused pointwise LSTM step ----------------------------------------------------
    def lstm_forward_step(self, z, c_prev, h_prev, c, h, forget_bias,
                          mask=None, zc=None, zh=None, gmask=None) -> None:
        dt = getattr(z, "dtype", None)
        B, H4 = z.shape
        H = H4 // 4
        bh, a = (B, H), self._arg
        args = (a("z", z, (B, 4 * H), dt), a("c_prev", c_prev, bh, dt), a("h_prev", h_prev, bh, dt),
                a("c", c, bh, dt), a("h", h, bh, dt),
                np.dtype(dt).type(forget_bias),           # the kernel's T, not a Python float
                a("mask", mask, (B,), dt, True), a("zc", zc, bh, dt, True),
                a("zh", zh, bh, dt, True), a("gmask", gmask, bh, dt, True),
                np.int64(B), np.int64(H))
        self._kernel("lstm_forward_step", dt)((self._grid(B * H),), (self.BLOCK,), args)

    def lstm_backward_step(self, gates, c_prev, dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                           mask=None, zc=None, zh=None, gmask=None) -> None:
        dt = getattr(gates, "dtype", None)
        B, H4 = gates.shape
        H = H4 // 4
        bh, bz, a = (B, H), (B, 4 * H), self._arg
        args = (a("gates", gates, bz, dt), a("c_prev", c_prev, bh, dt), a("dy", dy, bh, dt),
                a("dh_next", dh_next, bh, dt), a("dc_next", dc_next, bh, dt), a("dz", dz, bz, dt),
                a("dc_prev", dc_prev, bh, dt), a("dh_skip", dh_skip, bh, dt),
                a("mask", mask, (B,), dt, True), a("zc", zc, bh, dt, True),
                a("zh", zh, bh, dt, True), a("gmask", gmask, bh, dt, True),
                np.int64(B), np.int64(H))
        self._kernel("lstm_backward_step", dt)((self._grid(B * H),), (self.BLOCK,), args)

    # -- the LayerNorm LSTM step ------------------------------------------------------------
    def ln_lstm_forward_step(self, z, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h,
                             gain, shift, c_gain, c_shift, forget_bias, eps,
                             mask=None, zc=None, zh=None, gmask=None) -> None:
        dt = getattr(z, "dtype", None)
        B, H4 = z.shape
        H = H4 // 4
        bh, bz, a, T = (B, H), (B, 4 * H), self._arg, np.dtype(dt).type
        args = (a("z", z, bz, dt), a("zhat", zhat, bz, dt), a("rstd", rstd, (B, 4), dt),
                a("chat", chat, bh, dt), a("rstd_c", rstd_c, (B,), dt),
                a("c_prev", c_prev, bh, dt), a("h_prev", h_prev, bh, dt), a("c", c, bh, dt),
                a("h", h, bh, dt), a("gain", gain, (4 * H,), dt), a("shift", shift, (4 * H,), dt),
                a("c_gain", c_gain, (H,), dt), a("c_shift", c_shift, (H,), dt),
                T(forget_bias), T(eps),
                a("mask", mask, (B,), dt, True), a("zc", zc, bh, dt, True),
                a("zh", zh, bh, dt, True), a("gmask", gmask, bh, dt, True),
                np.int64(B), np.int64(H))
        # one block per batch row: its layer-norm sums are block reductions
        self._kernel("ln_lstm_forward_step", dt)((B,), (self._row_block(H),), args)

    def ln_lstm_backward_step(self, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift,
                              dy, dh_next, dc_next, dz, dc_prev, dh_skip,
                              dgain, dshift, dc_gain, dc_shift,
                              mask=None, zc=None, zh=None, gmask=None) -> None:
        dt = getattr(gates, "dtype", None)
        B, H4 = gates.shape
        H = H4 // 4
        bh, bz, a = (B, H), (B, 4 * H), self._arg
        part = self._tmp("ln_part", (B, 10 * H), dt)     # per-row gradient contributions
        args = (a("gates", gates, bz, dt), a("zhat", zhat, bz, dt), a("rstd", rstd, (B, 4), dt),
                a("chat", chat, bh, dt), a("rstd_c", rstd_c, (B,), dt), a("c_prev", c_prev, bh, dt),
                a("gain", gain, (4 * H,), dt), a("c_gain", c_gain, (H,), dt),
                a("c_shift", c_shift, (H,), dt), a("dy", dy, bh, dt), a("dh_next", dh_next, bh, dt),
                a("dc_next", dc_next, bh, dt), a("dz", dz, bz, dt), a("dc_prev", dc_prev, bh, dt),
                a("dh_skip", dh_skip, bh, dt), part,
                a("mask", mask, (B,), dt, True), a("zc", zc, bh, dt, True),
                a("zh", zh, bh, dt, True), a("gmask", gmask, bh, dt, True),
                np.int64(B), np.int64(H))
        self._kernel("ln_lstm_backward_step", dt)((B,), (self._row_block(H),), args)
        acc = (part, a("dgain", dgain, (4 * H,), dt), a("dshift", dshift, (4 * H,), dt),
               a("dc_gain", dc_gain, (H,), dt), a("dc_shift", dc_shift, (H,), dt),
               np.int64(B), np.int64(H))
        # column sums over the rows, in row order: deterministic, unlike atomics
        self._kernel("ln_accumulate", dt)((self._grid(10 * H),), (self.BLOCK,), acc)

    # -- GEMM -------------------------------------------------------------------------------
    def _mixed(self):
        """The cublasGemmEx path of the tf32/bf16 modes (``cupy_gemm.py``; not yet run on a GPU)."""
        m = getattr(self, "_mixed_gemm", None)
        if m is None:
            from .cupy_gemm import MixedGemm

            m = self._mixed_gemm = MixedGemm(self)
        return m

    def gemm_operand(self, a, precision="float32"):
        if precision == "float32":
            return a
        return self._mixed().operand(a, precision)

    def matmul(self, a, b, out=None, precision="float32"):
        if precision == "float32":
            return self.xp.matmul(a, b, out=out)
        return self._mixed().gemm(a, b, out, precision, beta=0.0)

    def matmul_add(self, a, b, out, precision="float32") -> None:
        """out += a @ b as one cuBLAS gemm with beta = 1 (no temporary, no host sync).

        Transposed views (``U.T``, ``x2.T``) go to cuBLAS as transpose flags, not copies:
        ``cupy.cublas.gemm`` accepts any C- or F-contiguous 2-D operand. Other layouts are
        copied by cupy first; other ranks or mixed dtypes fall back to ``out += a @ b``.
        tf32/bf16: cublasGemmEx with beta = 1 (``cupy_gemm.py``).
        """
        if precision != "float32":
            self._mixed().gemm(a, b, out, precision, beta=1.0)
            return
        if a.ndim == 2 and b.ndim == 2 and out.ndim == 2 and a.dtype == b.dtype == out.dtype \
                and a.dtype.char in "fd":
            from cupy import cublas

            cublas.gemm("N", "N", a, b, out=out, alpha=1.0, beta=1.0)
        else:
            out += a @ b
