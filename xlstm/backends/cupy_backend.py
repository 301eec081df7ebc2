"""CuPy backend: the plumbing that runs the ops' CUDA kernels (``xlstm/kernels``) on a GPU.

This is the only module (with its package) that imports cupy, and it does so lazily, so
``import xlstm`` works on machines without cupy or without a GPU. The ops themselves (their
specs, launches and dispatch) are in ``xlstm/ops`` and installed here as methods; this class
compiles (``_kernel``), launches with every argument checked against the op's spec
(``launch``), keeps scratch (``scratch``), captures and replays graphs, plans persistent launches.

How the CUDA path is built: ``xlstm/kernels/lstm_kernels.cu`` (with its header
``lstm_pointwise.cuh`` pasted in by ``xlstm.kernels.kernel_source``) is compiled at run time by
NVRTC through ``cupy.RawModule``, once per device and process (cupy also caches the binary on
disk, keyed by the source text). A layer-direction's time loop is one op
(``xlstm/ops/lstm_sequence.py``): per time step one cuBLAS GEMM (``matmul_add``, beta = 1)
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
cuBLAS). A capture the device refuses does not end the run: the backend says why once,
turns its graphs off and runs the eager loop. Traces (``trace=True``) run eagerly
(``Backend.eager``). The capture logic is checked on the CPU against a stand-in cupy
(tests/test_cuda_graphs.py).

Persistent kernels (``xlstm/kernels/lstm_persistent.cu``, their own RawModule compiled with
``enable_cooperative_groups=True``): the plain cell's ``lstm_forward_sequence`` and
``lstm_backward_sequence`` may instead run all T steps in one cooperative launch that keeps
U's slice of each block in shared memory. ``persistent`` ("auto" | "on" | "off", default the
environment variable XLSTM_PERSISTENT, else "off") picks; "auto" follows the crossover table
of ``xlstm.backends.persistent`` (estimated limits; docs/VERIFICATION.md) and falls back to the
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

from .. import ops
from ..errors import InputError
from . import cuda_graphs
from . import persistent as _persistent
from .base import Backend
from .scratch import Scratch

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
    """Fused CUDA kernels for the ops, cuBLAS for the GEMMs.

    Arrays handed to the ops must be cupy arrays of one dtype (float32 or float64), C-contiguous
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
        self.scratch = Scratch(cupy, device=cupy.cuda.runtime.getDevice)   # reused across steps
        self._null = np.uint64(0)     # a NULL pointer argument: 8 zero bytes, as a T* parameter
        #                               (cupy < 14 passes None as garbage, cupy#9046)
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

        _persistent.require_cupy(self.xp.__version__)
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

    def launch_persistent(self, name, dt, args, T, B, H, plan=None):
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

    def _persistent_mode(self) -> str:
        return _persistent.mode_from_env() if self.persistent is None else self.persistent

    def run_sequence(self, persistent_op, fallback, B, H, precision, *args) -> None:
        """The persistent op where the picker says so and the shape fits, else ``fallback`` (the
        per-step loop, graph-replayed where graphs are active). ``eager()`` forces the fallback.
        Persistent kernels multiply in the array dtype only: a tf32/bf16 ``precision`` always
        runs the per-step loop (``persistent="on"`` raises PersistentUnfit saying so)."""
        mode = self._persistent_mode()
        if not self.force_eager and _persistent.choose(mode, B=B, H=H, device_name=self.device_info()[0]):
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

    def grid(self, n: int) -> int:
        """Blocks for n elements at BLOCK threads each, capped at WAVES blocks per SM."""
        dev = self.xp.cuda.runtime.getDevice()
        sms = self._sm_count.get(dev)
        if sms is None:
            sms = self._sm_count[dev] = self.xp.cuda.Device(dev).attributes["MultiProcessorCount"]
        return max(1, min((n + self.BLOCK - 1) // self.BLOCK, sms * self.WAVES))

    @staticmethod
    def row_block(H: int) -> int:
        """Threads per row block of the LayerNorm kernels: a multiple of 32, about H, <= 256."""
        return min(256, max(32, (H + 31) // 32 * 32))

    def tmp(self, key, shape, dtype):
        """A device scratch buffer reused across time steps (so the loop does not allocate)."""
        return self.scratch.get(key, shape, dtype)

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

    def kernel_args(self, spec, kernel: str, values: dict, dims: dict, dtype) -> tuple:
        """The parameters of ``spec``'s kernel ``kernel`` in its order (``OpSpec.kernel_args``):
        each array checked by ``_arg`` against its declared shape and dtype ("T": ``dtype``),
        each scalar as its declared type, each dimension as int64."""
        def check(arg, a, shape):
            return self._arg(arg.name, a, shape, dtype if arg.dtype == "T" else np.dtype(arg.dtype), arg.optional)

        def scalar(s, v):
            return (np.dtype(dtype) if s.dtype == "T" else np.dtype(s.dtype)).type(v)

        return spec.kernel_args(kernel, values, dims, check, scalar)

    def launch(self, spec, kernel: str, grid: int, block: int, values: dict, dims: dict, dtype) -> None:
        """One launch of ``spec``'s kernel ``kernel`` (its ``_f32``/``_f64`` entry for ``dtype``)
        on a 1-D grid, its arguments taken by name from ``values`` and checked."""
        args = self.kernel_args(spec, kernel, values, dims, dtype)
        k = spec.kernel(kernel)
        fn = self._kernel(k.name, dtype) if k.typed else self._function(k.name)
        fn((grid,), (block,), args)

    def op_scratch(self, spec, name: str, dims: dict, dtype):
        """The scratch buffer ``name`` that ``spec`` declares, for these dimensions (made once)."""
        arg = spec[name]
        return self.tmp(f"{spec.name}.{name}", spec.shape(name, dims), dtype if arg.dtype == "T" else arg.dtype)

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

    def mixed_gemm(self):
        """The tf32/bf16 operands and products (``cupy_gemm.py``, on ``CublasGemm.gemm_ex``)."""
        m = getattr(self, "_mixed_gemm", None)
        if m is None:
            from .cupy_gemm import MixedGemm

            m = self._mixed_gemm = MixedGemm(self)
        return m

    def cupy_gemm_add(self, a, b, out) -> None:
        """out += a @ b through cupy's cuBLAS wrapper (where nvmath-python is missing)."""
        from cupy import cublas

        cublas.gemm("N", "N", a, b, out=out, alpha=1.0, beta=1.0)

    # -- the time loops: eager, or replayed as CUDA graphs ------------------------------------
    def graphs_active(self) -> bool:
        """True when the sequence ops replay CUDA graphs now (switch on, not inside ``eager()``,
        nvmath-python present)."""
        return bool(self.cuda_graphs) and not self.force_eager and self._gemm() is not None

    def graph_or_eager(self, op, args, kwargs):
        """The sequence op's reference loop (``xlstm.ops.lstm_sequence``), eager or served by a
        captured graph."""
        fn = ops.REFERENCE[op]
        if not self.graphs_active():
            return fn(self, *args, **kwargs)
        bound = cuda_graphs.bind(fn, self, args, kwargs)
        try:
            self.graphs.run(self, op, fn, bound)
        except cuda_graphs.CaptureFailed as e:
            self._graphs_failed(str(e))
            fn(self, **bound)

    def _graphs_failed(self, reason: str) -> None:
        """A capture failed: say why once, turn graphs off for this backend (the eager loop runs
        from now on, the same kernels and GEMMs); ``graphs.failure`` keeps the reason."""
        self.cuda_graphs = False
        self.graphs.failure = reason
        print(f"xlstm: CUDA graph capture failed ({reason}); CUDA graphs are off for this "
              f"backend and its loops run eagerly (same results, more host time per step)",
              file=sys.stderr)

    def prepare_capture(self, op, args) -> list:
        """Everything a capture of ``op`` would otherwise allocate or load, done now (capture
        must not allocate): the kernels and scratch of the op's steps (from their specs), the
        SM count, the GEMM handle (bf16: the cast kernel and the [B,H] / [B,4H] bits of the
        per-step left operand). Returns the scratch buffers the graph has to keep alive
        (``scratch`` may drop its own reference later; the graph has their addresses baked in)."""
        dt = args["gates"].dtype
        B, H4 = args["gates"].shape[1:]
        dims = dict(B=B, H=H4 // 4)
        keep = []
        for step in ops.SPECS[op].steps:
            for k in step.kernels:
                self._kernel(k.name, dt)
            keep += [self.op_scratch(step, s.name, dims, dt) for s in step.scratch]
        self.grid(1)
        self._gemm()
        if args.get("precision", "float32") == "bf16":
            self._function("f32_to_bf16")
            # the per-step left operand: hs[t] [B,H] forward, dz[t] [B,4H] backward
            cols = H4 // 4 if "forward" in op else H4
            keep.append(self.tmp(self.mixed_gemm().SCRATCH_A, (B, cols), np.uint16))
        return keep

ops.install(CupyBackend, "cupy")
