"""CuPy backend: the same pointwise LSTM step as fused CUDA kernels (``xlstm/kernels``).

This is the only module (with its package) that imports cupy, and it does so lazily, so
``import xlstm`` works on machines without cupy or without a GPU.

How the CUDA path is built: ``xlstm/kernels/lstm_kernels.cu`` (with its header
``lstm_pointwise.cuh`` pasted in by ``xlstm.kernels.kernel_source``) is compiled at run time by
NVRTC through ``cupy.RawModule``, once per device and process (cupy also caches the binary on
disk, keyed by the source text). A layer-direction's time loop is one backend op (the
``*_sequence`` ops of ``Backend``): per time step one cuBLAS GEMM (``matmul_add``, beta = 1)
and one fused kernel launch (the LayerNorm step's backward: two, the second adding the rows'
gain/shift gradients); nothing waits for the device inside the loop, and the only buffer a
step needs (the LayerNorm backward's [B,10H] partial sums) is allocated once per shape.

CUDA graphs (``xlstm/backends/cuda_graphs.py``): with ``cuda_graphs`` on (the default; off with
``XLSTM_CUDA_GRAPHS=0`` or ``backend.cuda_graphs = False``), the first call of a sequence op
for a shape captures that loop into a CUDA graph and every later call replays it, so Python
issues a few copies and one launch per layer-direction instead of two launches per step.
The GEMMs then go through ``CublasGemm`` (nvmath-python's cuBLAS binding; CuPy's refuses
capture) in eager and captured runs alike, so both are the same cuBLAS calls and bitwise
equal. Without nvmath-python the backend says so once and runs the eager loop (cupy's
cuBLAS). Traces (``trace=True``) run eagerly (``Backend.eager``). Not yet run on a GPU: the
capture logic is proven on the CPU against a stand-in cupy (tests/test_cuda_graphs.py).

Persistent kernels (``xlstm/kernels/lstm_persistent.cu``, their own RawModule compiled with
``enable_cooperative_groups=True``): the plain cell's ``lstm_forward_sequence`` and
``lstm_backward_sequence`` may instead run all T steps in one cooperative launch that keeps
U's slice of each block in shared memory. ``persistent`` ("auto" | "on" | "off", default the
environment variable XLSTM_PERSISTENT, else "off" until the
table is measured on a device) picks; "auto" follows the crossover table
of ``xlstm.backends.persistent`` (UNMEASURED: written without a GPU) and falls back to the
per-step loop (graph-replayed where graphs are on) where the grid does not fit; "on" raises
instead of falling back. Persistent launches are never captured into a graph (each zeroes its
own grid-barrier counter) and ``eager()`` (traces) runs the per-step loop.

Precision modes (``xlstm/precision.py``): tf32/bf16 products go through the same
``CublasGemm`` handle (``gemm_ex``, cublasGemmEx) with operands prepared by ``cupy_gemm.py``,
so they are captured and replayed like float32 (``precision`` is part of the graph key, the
rounded U / U^T a graph input); without nvmath-python they raise, naming the install. The
persistent kernels multiply in full float32/float64, so tf32/bf16 always take the per-step loop.
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np

from ..errors import InputError
from . import cuda_graphs
from . import persistent as _persistent
from .base import Backend

_graphs_note_shown = False


def graphs_env_default() -> bool:
    """``XLSTM_CUDA_GRAPHS``: unset or 1/on/true/yes -> True; 0/off/false/no -> False."""
    v = os.environ.get("XLSTM_CUDA_GRAPHS", "1").strip().lower()
    if v in ("", "1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise InputError(f"XLSTM_CUDA_GRAPHS must be 0 or 1 (or on/off), got {v!r}")


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
                "`pip install 'xlstm-bptt[cuda12]'` or `pip install 'xlstm-bptt[cuda13]'` to match your CUDA driver")
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


def use_device(index: int) -> None:
    """Make CUDA device ``index`` the current one (kernels and buffers are per device).

    Nothing happens where cupy or a device is missing: resolving the backend reports that.
    """
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return
    if index >= n:
        raise InputError(f"process {index} on this machine has no GPU of its own: the machine has {n}; "
                         f"start at most {n} processes per machine (--nproc / torchrun --nproc-per-node)")
    cupy.cuda.Device(int(index)).use()


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
        #                               on every cupy (cupy < 14 passed None as garbage, cupy#9046;
        #                               14.x passes it as 0: cupy/cuda/function.pyx _pointer)
        self.cuda_graphs = graphs_env_default()   # the switch; False runs the eager loop
        self.graphs = cuda_graphs.GraphCache(maxsize=16)
        self._gemms: dict = {}        # device id -> CublasGemm, or None where nvmath is missing
        self._pmodules: dict = {}     # device id -> the persistent kernels' cooperative RawModule
        self._devinfo: dict = {}      # device id -> (name, SMs, smem per block opt-in, smem per SM)
        self.persistent: str | None = None   # "auto" | "on" | "off"; None: XLSTM_PERSISTENT
        self.last_path: str | None = None    # "persistent" or "per-step": what the last sequence op ran

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a, copy: bool = False):
        out = self.xp.asnumpy(a)          # from the device: a new host array
        return np.array(out) if copy and out is a else out   # a host array given: itself

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
                # no -use_fast_math: tanh must stay the accurate one (the tests' tolerances).
                # cupy itself appends -ftz=true (float32 denormals flush to zero on the GPU)
                # and -arch=sm_XX of the device (tests/test_kernels_compile.py compiles so)
                mod = self._modules[dev] = self.xp.RawModule(code=kernel_source(), options=("-std=c++17",))
            k = self._kernels[key] = mod.get_function(full_name)
        return k

    def _persistent_kernel(self, name: str, dtype):
        """``{name}_{f32|f64}`` of the persistent source, from its cooperative module."""
        from ..kernels import DTYPE_SUFFIX, PERSISTENT_SOURCE, kernel_source

        dev = self.xp.cuda.runtime.getDevice()
        key = (dev, f"{name}_{DTYPE_SUFFIX[np.dtype(dtype).name]}")
        k = self._kernels.get(key)
        if k is None:
            mod = self._pmodules.get(dev)
            if mod is None:
                mod = self._pmodules[dev] = self.xp.RawModule(
                    code=kernel_source(PERSISTENT_SOURCE), options=("-std=c++17",),
                    enable_cooperative_groups=True)
            k = self._kernels[key] = mod.get_function(key[1])
        return k

    def device_info(self):
        """(name, SMs, dynamic shared memory one block may opt into, shared memory per SM)."""
        dev = self.xp.cuda.runtime.getDevice()
        info = self._devinfo.get(dev)
        if info is None:
            attrs = self.xp.cuda.Device(dev).attributes
            name = self.xp.cuda.runtime.getDeviceProperties(dev)["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            info = self._devinfo[dev] = (name, attrs["MultiProcessorCount"],
                                         attrs["MaxSharedMemoryPerBlockOptin"],
                                         attrs["MaxSharedMemoryPerMultiprocessor"])
        return info

    def persistent_plan(self, B: int, H: int, dtype) -> "_persistent.Plan":
        """The persistent launch for [B,H] on the current device, or PersistentUnfit (says why)."""
        name, sms, per_block, per_sm = self.device_info()
        return _persistent.plan(B, H, np.dtype(dtype).itemsize, sm_count=sms,
                                smem_per_block=per_block, smem_per_sm=per_sm)

    def _launch_persistent(self, name, dt, args, T, B, H, plan=None):
        """One cooperative launch of ``name`` with ``args`` + (barrier, T, B, H, KS).

        Checks co-residency first: CuPy shrinks a 1-D cooperative grid larger than the device
        holds to what fits, with only a warning (cupy 14 cupy/cuda/function.pyx ``_launch``),
        and the kernel's grid barrier would then wait for blocks that do not exist (and trap
        after 10 s). ``plan`` defaults to ``persistent_plan(B, H, dt)``.
        """
        plan = self.persistent_plan(B, H, dt) if plan is None else plan
        smem = plan.smem_backward if "backward" in name else plan.smem_forward
        k = self._persistent_kernel(name, dt)
        if smem > 48 * 1024:               # dynamic shared memory above 48 KB is opt-in per kernel
            k.max_dynamic_shared_size_bytes = smem
        per_sm = self.xp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(k.kernel.ptr, plan.nt, smem)
        sms = self.device_info()[1]
        if per_sm * sms < plan.NB:
            raise _persistent.PersistentUnfit(
                f"{name}: {plan.NB} blocks of {plan.nt} threads and "
                f"{smem} bytes of shared memory are not co-resident ({per_sm} per SM x {sms} SMs)")
        barrier = self.xp.zeros(1, np.uint32)       # the grid barrier's counter, zeroed per launch
        args = tuple(args) + (barrier, np.int64(T), np.int64(B), np.int64(H), np.int64(plan.KS))
        k((plan.NB,), (plan.nt,), args, shared_mem=smem)

    def persistent_lstm_forward_sequence(self, gates, hs, cs, U, forget_bias,
                                         mask=None, zc=None, zh=None, gmask=None) -> None:
        """``lstm_forward_sequence`` as one persistent launch (same arguments and results).

        Raises PersistentUnfit when the shape does not fit the device's shared memory or
        co-residency (``persistent_plan`` says why); the per-step loop has no such limit.
        """
        dt = getattr(gates, "dtype", None)
        T, B, H4 = gates.shape
        H = H4 // 4
        a, tbh = self._arg, (T, B, H)
        args = (a("gates", gates, (T, B, 4 * H), dt), a("hs", hs, (T + 1, B, H), dt),
                a("cs", cs, (T + 1, B, H), dt), a("U", U, (H, 4 * H), dt), np.dtype(dt).type(forget_bias),
                a("mask", mask, (T, B), dt, True), a("zc", zc, tbh, dt, True),
                a("zh", zh, tbh, dt, True), a("gmask", gmask, tbh, dt, True))
        if T > 0:
            self._launch_persistent("lstm_persistent_forward", dt, args, T, B, H)

    def persistent_lstm_backward_sequence(self, gates, cs, dy, dh, dc, dz, UT,
                                          mask=None, zc=None, zh=None, gmask=None) -> None:
        """``lstm_backward_sequence`` as one persistent launch (same arguments and results)."""
        dt = getattr(gates, "dtype", None)
        T, B, H4 = gates.shape
        H = H4 // 4
        a, tbh = self._arg, (T, B, H)
        args = (a("gates", gates, (T, B, 4 * H), dt), a("cs", cs, (T + 1, B, H), dt), a("dy", dy, tbh, dt),
                a("dh", dh, (B, H), dt), a("dc", dc, (B, H), dt), a("dz", dz, (T, B, 4 * H), dt),
                a("UT", UT, (4 * H, H), dt), a("mask", mask, (T, B), dt, True), a("zc", zc, tbh, dt, True),
                a("zh", zh, tbh, dt, True), a("gmask", gmask, tbh, dt, True))
        if T > 0:
            self._launch_persistent("lstm_persistent_backward", dt, args, T, B, H)

    def _persistent_mode(self) -> str:
        return _persistent.mode_from_env() if self.persistent is None else self.persistent

    def _run_sequence(self, persistent_op, fallback, B, H, precision, *args) -> None:
        """The persistent op where the picker says so and the shape fits, else ``fallback`` (the
        per-step loop, graph-replayed where graphs are active). ``eager()`` forces the fallback.
        Persistent kernels multiply in the array dtype only: a tf32/bf16 ``precision`` always
        runs the per-step loop (``persistent="on"`` raises PersistentUnfit saying so)."""
        mode = self._persistent_mode()
        if not self._force_eager and _persistent.choose(mode, B=B, H=H, device_name=self.device_info()[0]):
            try:
                if precision != "float32":
                    raise _persistent.PersistentUnfit(
                        f"the persistent kernels multiply in full float32/float64, not in precision "
                        f"{precision!r}; use persistent='auto' or 'off' (the per-step loop) for it")
                persistent_op(*args)
                self.last_path = "persistent"
                return
            except _persistent.PersistentUnfit:
                if mode == "on":
                    raise
        fallback(*args)
        self.last_path = "per-step"

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

    # -- the optimiser ------------------------------------------------------------------------
    def adam_step(self, p, g, m, v, decay, b1, c1, b2, c2, bc2, eps, step) -> None:
        """One Adam/AdamW update of the flat buffers p, g, m, v [n] in one launch.

        p = p*decay; m = m*b1 + g*c1; v = v*b2 + g*g*c2; p -= m / (sqrt(v)/bc2 + eps) * step,
        each operation rounded as NumPy's passes over the same buffers (kernels/optim.cuh).
        """
        dt = getattr(p, "dtype", None)
        n = int(p.size)
        a, T = self._arg, np.dtype(dt).type
        args = (a("p", p, (n,), dt), a("g", g, (n,), dt), a("m", m, (n,), dt), a("v", v, (n,), dt),
                *(T(x) for x in (decay, b1, c1, b2, c2, bc2, eps, step)), np.int64(n))
        self._kernel("adam_step", dt)((self._grid(n),), (self.BLOCK,), args)

    NORM_THREADS = 256     # the one block of grad_norm (xlstm::NORM_THREADS in optim.cuh)

    def clip_by_global_norm(self, g, max_norm):
        """Global-norm clipping of the flat gradient buffer g [n] in two launches, no host read.

        total = sqrt(sum g^2) summed in float64 in a fixed order (one block, then a tree);
        g *= max_norm / total where total is finite and > max_norm. Returns total, a 0-d float64
        device array (read at the log interval).
        """
        dt = getattr(g, "dtype", None)
        n = int(g.size)
        g = self._arg("g", g, (n,), dt)
        total = self.xp.empty((), np.float64)
        self._kernel("grad_norm", dt)((1,), (self.NORM_THREADS,), (g, np.int64(n), total))
        self._kernel("clip_by_norm", dt)((self._grid(n),), (self.BLOCK,),
                                         (g, np.int64(n), total, np.float64(max_norm)))
        return total

    XENT_THREADS = 256     # threads per row of softmax_xent (xlstm::XENT_THREADS in xent.cuh)

    def softmax_cross_entropy(self, x, t, count):
        """(nll [N], dx [N,V]) of logits x [N,V] and targets t [N] in one launch (kernels/xent.cuh).

        nll = -log softmax(x)[t] per row; dx = (softmax(x) - onehot(t)) / count.
        """
        dt = getattr(x, "dtype", None)
        N, V = x.shape
        if t.dtype != np.int64:
            t = t.astype(np.int64)
        a = self._arg
        dx, nll = self.xp.empty((N, V), dt), self.xp.empty((N,), dt)
        args = (a("logits", x, (N, V), dt), a("targets", t, (N,), np.int64), dx, nll,
                np.int64(N), np.int64(V), np.dtype(dt).type(count))
        self._kernel("softmax_xent", dt)((max(1, min(N, self._grid(N * self.XENT_THREADS))),),
                                         (self.XENT_THREADS,), args)
        return nll, dx

    # -- GEMM -------------------------------------------------------------------------------
    def _gemm(self):
        """This device's ``CublasGemm``, or None where nvmath-python is missing (said once)."""
        global _graphs_note_shown
        dev = self.xp.cuda.runtime.getDevice()
        if dev not in self._gemms:
            from .cublas_gemm import INSTALL_HINT, CublasGemm
            try:
                self._gemms[dev] = CublasGemm(self.xp)
            except Exception as e:    # not installed, or its cuBLAS cannot be loaded/created
                self._gemms[dev] = None
                if not _graphs_note_shown:
                    _graphs_note_shown = True
                    print(f"xlstm: CUDA graphs are off: nvmath-python's cuBLAS is not usable "
                          f"({type(e).__name__}: {e}); the "
                          f"cupy backend runs its eager loop (two launches per step) and has no "
                          f"tf32/bf16 GEMMs. To replay the loop as a CUDA graph, {INSTALL_HINT}.",
                          file=sys.stderr)
        return self._gemms[dev]

    def _mixed(self):
        """The tf32/bf16 operands and products (``cupy_gemm.py``, on ``CublasGemm.gemm_ex``)."""
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

        Through ``CublasGemm`` (nvmath's binding, capturable) where nvmath-python is installed,
        else ``cupy.cublas.gemm``. Transposed views (``U.T``, ``x2.T``) go to cuBLAS as
        transpose flags, not copies. Other layouts are copied by cupy first; other ranks or
        mixed dtypes fall back to ``out += a @ b``. tf32/bf16: ``CublasGemm.gemm_ex`` with
        beta = 1 (``cupy_gemm.py``); these need nvmath-python and say so without it.
        """
        if precision != "float32":
            self._mixed().gemm(a, b, out, precision, beta=1.0)
            return
        if a.ndim == 2 and b.ndim == 2 and out.ndim == 2 and a.dtype == b.dtype == out.dtype \
                and a.dtype.char in "fd":
            g = self._gemm()
            if g is not None and g.supports(a, b, out):
                g.matmul_add(a, b, out)
                return
            from cupy import cublas

            cublas.gemm("N", "N", a, b, out=out, alpha=1.0, beta=1.0)
        else:
            out += a @ b

    # -- the time loops: eager, or replayed as CUDA graphs ------------------------------------
    def graphs_active(self) -> bool:
        """True when the sequence ops replay CUDA graphs now (switch on, not inside ``eager()``,
        nvmath-python present)."""
        return bool(self.cuda_graphs) and not self._force_eager and self._gemm() is not None

    def _sequence(self, op, args, kwargs):
        fn = getattr(Backend, op)
        if not self.graphs_active():
            return fn(self, *args, **kwargs)
        self.graphs.run(self, op, fn, cuda_graphs.bind(fn, self, args, kwargs))

    def prepare_capture(self, op, args) -> list:
        """Everything a capture of ``op`` would otherwise allocate or load, done now (capture
        must not allocate): the op's kernels, the SM count, the GEMM handle and the scratch
        (bf16: the cast kernel and the [B,H] / [B,4H] bits of the per-step left operand).
        Returns the scratch buffers the graph has to keep alive (``_tmp`` may drop its own
        reference later; the graph has their addresses baked in)."""
        dt = args["gates"].dtype
        B, H4 = args["gates"].shape[1:]
        names = {"lstm_forward_sequence": ("lstm_forward_step",),
                 "lstm_backward_sequence": ("lstm_backward_step",),
                 "ln_lstm_forward_sequence": ("ln_lstm_forward_step",),
                 "ln_lstm_backward_sequence": ("ln_lstm_backward_step", "ln_accumulate")}[op]
        for n in names:
            self._kernel(n, dt)
        self._grid(1)
        self._gemm()
        keep = []
        if op == "ln_lstm_backward_sequence":
            keep.append(self._tmp("ln_part", (B, 10 * (H4 // 4)), dt))
        if args.get("precision", "float32") == "bf16":
            self._function("f32_to_bf16")
            # the per-step left operand: hs[t] [B,H] forward, dz[t] [B,4H] backward
            cols = H4 // 4 if "forward" in op else H4
            keep.append(self._tmp(self._mixed().SCRATCH_A, (B, cols), np.uint16))
        return keep

    def lstm_forward_sequence(self, gates, hs, cs, U, forget_bias,
                              mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """``Backend.lstm_forward_sequence`` (same arguments): persistent where picked, else
        eager or replayed as a graph."""
        B, H = hs.shape[1:]
        self._run_sequence(self.persistent_lstm_forward_sequence,
                           lambda *a: self._sequence("lstm_forward_sequence", a, {"precision": precision}),
                           B, H, precision, gates, hs, cs, U, forget_bias, mask, zc, zh, gmask)

    def lstm_backward_sequence(self, gates, cs, dy, dh, dc, dz, UT,
                               mask=None, zc=None, zh=None, gmask=None, precision="float32") -> None:
        """``Backend.lstm_backward_sequence`` (same arguments): persistent where picked, else
        eager or replayed as a graph."""
        B, H = dh.shape
        self._run_sequence(self.persistent_lstm_backward_sequence,
                           lambda *a: self._sequence("lstm_backward_sequence", a, {"precision": precision}),
                           B, H, precision, gates, cs, dy, dh, dc, dz, UT, mask, zc, zh, gmask)

    def ln_lstm_forward_sequence(self, *args, **kwargs) -> None:
        """``Backend.ln_lstm_forward_sequence`` (same arguments), eager or replayed as a graph."""
        self._sequence("ln_lstm_forward_sequence", args, kwargs)

    def ln_lstm_backward_sequence(self, *args, **kwargs) -> None:
        """``Backend.ln_lstm_backward_sequence`` (same arguments), eager or replayed as a graph."""
        self._sequence("ln_lstm_backward_sequence", args, kwargs)
