"""The CuPy backend: what it says where it cannot run, its launches, and CuPy-vs-NumPy equality.

Three groups:

* CPU, always: ``set_backend("cupy")`` on a machine without a usable GPU raises
  BackendUnavailableError with the reason; ``auto`` falls back to NumPy; ``xlstm info`` says why.
* CPU, always (where g++ exists): ``CupyBackend`` itself, unchanged, runs against a stand-in
  ``cupy`` module whose RawModule launches the host twins of the kernels
  (``tests/kernels_host_shim.cpp``) and whose arrays are NumPy's. This checks every launch of
  the backend (argument count, order and C types read from the .cu source, NULL for absent
  masks, dtype-typed scalars, contiguity, block sizes) and runs whole LSTMs through it against
  the NumPy backend. Only the device itself (NVRTC's binary, cuBLAS) is not exercised.
  The stand-in also has streams whose capture records launches and GEMMs (with the addresses
  they were given) for ``Graph.launch`` to replay, and a stand-in of nvmath's cuBLAS binding:
  tests/test_cuda_graphs.py uses them for the CUDA-graph path.
* ``@pytest.mark.gpu``: the same comparisons on a real GPU (skipped with the reason elsewhere,
  by tests/conftest.py): pointwise steps and full LSTMs (layers {1,2}, bidirectional, lengths,
  zoneout + recurrent dropout with shared masks, layer norm), every output, state, dx and
  gradient, float64 to 1e-10 and float32 to 1e-5, normwise max|a-b| / max|b|.
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
import types

import numpy as np
import pytest

import kernels_host_lib
import xlstm
from xlstm.backends import NumpyBackend, cupy_unavailable_reason, resolve
from xlstm.errors import BackendUnavailableError, InputError

TOL = {"float64": 1e-10, "float32": 1e-5}


def normwise(a, b) -> float:
    """max|a-b| / max|b| (max|a-b| when b is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def assert_close(what, got, want, dtype, tol=None):
    dtype = np.dtype(dtype).name
    tol = TOL[dtype] if tol is None else tol[dtype]
    e = normwise(got, want)
    assert e <= tol, f"{what} ({dtype}): normwise error {e:.3g} > {tol:g}"


# =============================================================================================
# 1. Where cupy cannot run
# =============================================================================================
no_gpu = pytest.mark.skipif(cupy_unavailable_reason() is None, reason="a usable GPU is present here")


@no_gpu
def test_explicit_cupy_raises_with_the_reason():
    reason = cupy_unavailable_reason()
    with pytest.raises(BackendUnavailableError) as e:
        xlstm.set_backend("cupy")
    msg = str(e.value)
    assert reason in msg and "numpy" in msg
    assert xlstm.get_backend().name == "numpy"


@no_gpu
def test_auto_falls_back_to_numpy():
    assert resolve("auto").name == "numpy"
    assert xlstm.available_backends() == ["numpy"]
    out = subprocess.run([sys.executable, "-c", "import xlstm; print(xlstm.set_backend('auto').name)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"
    assert "cupy unavailable" in out.stderr          # 'auto' says which it chose, and why


@no_gpu
def test_info_reports_why_cupy_is_unavailable():
    out = subprocess.run([sys.executable, "-m", "xlstm", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("cupy")]
    assert line and "unavailable" in line[0] and cupy_unavailable_reason() in line[0]


# =============================================================================================
# 2. CupyBackend's launches on the host (a stand-in cupy module)
# =============================================================================================
class _HostKernel:
    """A RawKernel stand-in: checks a launch against the kernel's C signature, runs host_K."""

    def __init__(self, fake, name, params, cooperative=False):
        self.fake, self.name, self.params, self.cooperative = fake, name, params, cooperative
        # RawKernel.kernel is a cupy.cuda.function.Function; its .ptr is the CUfunction handle
        # (what cupy's driver.occupancyMaxActiveBlocksPerMultiprocessor and funcSetAttribute take)
        self.kernel = types.SimpleNamespace(ptr=id(self))
        self.max_dynamic_shared_size_bytes = 0   # a settable property on RawKernel

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        # RawKernel.__call__(grid, block, args, **kwargs) passes its own enable_cooperative_groups
        # to Function.__call__(tuple grid, tuple block, args, size_t shared_mem=0, stream=None,
        # enable_cooperative_groups=False): passing that kwarg again would be a TypeError
        assert not kwargs, f"{self.name}: unexpected launch options {kwargs}"
        assert isinstance(grid, tuple) and isinstance(block, tuple), "grid and block must be tuples"
        persistent = kernels_host_lib.takes_launch(self.name)
        if persistent:
            # what the device would refuse: a non-cooperative launch of a grid-barrier kernel,
            # more than 48 KB of dynamic shared memory without the opt-in attribute, more blocks
            # than are co-resident (CuPy would shrink the grid and the barrier would hang)
            assert self.cooperative, f"{self.name}: launched from a module without cooperative groups"
            assert shared_mem <= 48 * 1024 or shared_mem <= self.max_dynamic_shared_size_bytes, \
                f"{self.name}: {shared_mem} bytes of shared memory without raising the attribute"
            assert grid[0] <= self.fake.occupancy * self.fake.sms, f"{self.name}: grid {grid} not co-resident"
            assert block[0] <= 512, f"{self.name}: block {block} beyond __launch_bounds__(512)"
        else:
            assert shared_mem == 0, f"{self.name}: unexpected dynamic shared memory"
        assert grid[0] >= 1 and 1 <= block[0] <= 1024, (grid, block)
        if self.name.startswith("ln_lstm"):
            assert block[0] % 32 == 0, f"{self.name}: row blocks need a multiple of 32 threads"
        assert len(args) == len(self.params), \
            f"{self.name}: {len(args)} arguments for {len(self.params)} parameters"
        cargs = []
        for (ptr, base, pname), a in zip(self.params, args):
            want = kernels_host_lib.numpy_type(base)
            if ptr:
                if isinstance(a, np.ndarray):
                    assert a.dtype == want, f"{self.name}({pname}): dtype {a.dtype}, kernel takes {base}*"
                    assert a.flags.c_contiguous, f"{self.name}({pname}): not C-contiguous"
                    cargs.append(a.ctypes.data)
                else:
                    assert type(a) is np.uint64 and a == 0, \
                        f"{self.name}({pname}): {a!r} is neither an array nor a NULL pointer"
                    cargs.append(None)
            else:
                assert type(a) is want, f"{self.name}({pname}): {type(a).__name__}, kernel takes {base}"
                cargs.append(a.item())
        if persistent:
            cargs += [grid[0], block[0], shared_mem]
        self.fake.launches.append(self.name)
        if self.fake.counts is not None:
            self.fake.counts.op("raw:" + self.name)
        fn = getattr(self.fake.lib, "host_" + self.name)
        # on a capturing stream the launch is recorded with the addresses it got, not run
        self.fake.submit(lambda: fn(*cargs), self.fake.current, self.name)


class _HostModule:
    """A RawModule stand-in: the kernels of the source it is given, run on the host.

    As cupy 14's ``RawModule.__init__(self, *, str code=None, ..., tuple options=(), ...,
    bint enable_cooperative_groups=False, ...)``: keyword-only, ``options`` a tuple (a list is
    a TypeError there)."""

    def __init__(self, fake, *, code, options=(), enable_cooperative_groups=False):
        if not isinstance(options, tuple):
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got {type(options).__name__})")
        assert "-use_fast_math" not in options and "--use_fast_math" not in options
        self.fake, self.sigs = fake, kernels_host_lib.kernel_signatures(code)
        self.cooperative = enable_cooperative_groups
        fake.modules.append((code, tuple(options)))

    def get_function(self, name):
        assert name in self.sigs, f"no kernel {name!r} in the source given to RawModule"
        return _HostKernel(self.fake, name, self.sigs[name], self.cooperative)


class _FakeStream:
    """A cupy Stream stand-in: ``with s:`` makes it current; begin/end_capture record the work
    submitted to it (kernel launches, nvmath GEMMs) into a graph instead of running it."""

    def __init__(self, fake, ptr):
        self.fake, self.ptr, self.ops = fake, ptr, None
        fake.streams[ptr] = self

    def __enter__(self):
        self._prev, self.fake.current = self.fake.current, self
        return self

    def __exit__(self, *exc):
        self.fake.current = self._prev

    def begin_capture(self, mode=None):
        if self.ptr in (0, 1):             # as cupy's _BaseStream.begin_capture
            raise RuntimeError("cannot capture on the default (legacy) stream")
        assert self.fake.capturing is None and self.ops is None, "nested capture"
        self.ops, self.fake.capturing = [], self

    def end_capture(self):
        assert self.fake.capturing is self, "end_capture on a stream that is not capturing"
        ops, self.ops, self.fake.capturing = self.ops, None, None
        self.fake.captured.append([name for name, _ in ops])
        return _FakeGraph(self.fake, ops)

    def is_capturing(self):
        return self.ops is not None

    def synchronize(self):
        if self.fake.capturing is not None:
            raise RuntimeError("stream synchronize during stream capture (the device would be waited on)")
        if self.fake.counts is not None:
            self.fake.counts.sync("stream.synchronize")


class _FakeGraph:
    """cupy.cuda.graph.Graph stand-in: ``launch`` reruns the recorded work on the same addresses."""

    def __init__(self, fake, ops):
        self.fake, self.ops = fake, ops

    def launch(self, stream=None):
        assert self.fake.capturing is None, "graph launch during capture"
        self.fake.launched.append(len(self.ops))
        if self.fake.counts is not None:
            self.fake.counts.op("graph")
        for _, op in self.ops:
            op()

    def upload(self, stream=None):
        pass


# what allocates device memory in cupy. Refused during capture by the stand-in only: cupy 14
# captures in cudaStreamCaptureModeRelaxed, where its pool may allocate (cudaMalloc) without
# error. The refusal enforces the project's own rule: memory that the pool could hand out
# again once Python drops it must not be baked into a graph.
_ALLOCATORS = ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like", "full_like",
               "array", "ascontiguousarray", "copy")


class DeviceCounts:
    """What the code under test asked of the stand-in "device": host synchronisations and ops.

    syncs: every device->host read or wait, by kind: ``asnumpy``, ``get``, ``item``, ``tolist``,
    ``float``/``int``/``bool``/``index`` of a device array, ``stream.synchronize``.
    ops: every device operation the code issued, by kind: ``ufunc`` (an elementwise kernel or a
    reduction in cupy), ``gemm`` (``@``/matmul: cuBLAS), ``fn:<name>`` (a NumPy function with
    cupy's own kernel(s): argsort, nonzero, where, ...), ``gather`` (fancy indexing), ``setitem``
    (a copy or fill kernel), ``copy``/``astype``, ``raw:<kernel>`` and ``nvmath`` (counted by the
    stand-in's RawKernel and nvmath gemm). Allocations are not ops. uploads: host arrays moved
    to the device (``asarray`` of a NumPy array).
    """

    def __init__(self):
        import collections
        self.syncs = collections.Counter()
        self.ops = collections.Counter()
        self.uploads = 0
        self.sync_sites = collections.Counter()    # (file:line of the caller) -> count, to find them
        self.depth = 0                              # >0 inside an op: its internals are not ops

    def sync(self, kind):
        self.syncs[kind] += 1
        f = sys._getframe(2)
        while f is not None and ("test_cupy_backend" in f.f_code.co_filename or "numpy" in f.f_code.co_filename):
            f = f.f_back
        if f is not None:
            self.sync_sites[f"{f.f_code.co_filename.rsplit('/', 2)[-2:][-1]}:{f.f_lineno}"] += 1

    def op(self, kind):
        if self.depth == 0:
            self.ops[kind] += 1

    def reset(self):
        self.syncs.clear(), self.ops.clear(), self.sync_sites.clear()
        self.uploads = 0

    def total_syncs(self):
        return sum(self.syncs.values())

    def total_ops(self):
        return sum(self.ops.values())


def device_array_class(counts: DeviceCounts):
    """An ndarray subclass standing in for cupy.ndarray: its host reads are syncs, its ops are counted.

    As cupy's: a reduction or a scalar index gives a 0-d device array, not a host scalar, so
    ``float(a.sum())`` is a read of the device (counted) here as there.
    """

    def plain(x):
        return x.view(np.ndarray) if isinstance(x, Dev) else x

    def dev(r):
        if isinstance(r, np.generic):
            return np.asarray(r).view(Dev)
        if type(r) is np.ndarray:
            return r.view(Dev)
        if isinstance(r, tuple):
            return tuple(dev(x) for x in r)
        return r

    def inside(kind, fn, *a, **k):
        """fn(*a, **k) counted as one op ``kind`` (None: a view, no op); what it calls is not counted."""
        if kind:
            counts.op(kind)
        counts.depth += 1
        try:
            return fn(*a, **k)
        finally:
            counts.depth -= 1

    class Dev(np.ndarray):
        # seen as cupy's by xlstm.backends.backend_of and xlstm.checks (the stand-in must then be
        # the cupy backend: install_fakes(counting=True) arranges that)
        __module__ = "cupy"

        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            counts.op("gemm" if ufunc is np.matmul else "ufunc")
            if "out" in kwargs:
                kwargs["out"] = tuple(plain(o) for o in kwargs["out"])
            counts.depth += 1
            try:
                r = getattr(ufunc, method)(*(plain(i) for i in inputs), **kwargs)
            finally:
                counts.depth -= 1
            return dev(r)

        def __array_function__(self, func, types_, args, kwargs):
            name = func.__name__
            if not name.startswith("empty"):
                counts.op(f"fn:{name}")
            counts.depth += 1
            try:
                r = func._implementation(*args, **kwargs) if hasattr(func, "_implementation") \
                    else super().__array_function__(func, types_, args, kwargs)
            finally:
                counts.depth -= 1
            return dev(r)

        def __getitem__(self, idx):
            parts = idx if isinstance(idx, tuple) else (idx,)
            fancy = any(isinstance(i, (np.ndarray, list)) for i in parts)
            if fancy and all(isinstance(i, np.ndarray) and i.dtype.kind in "iu" for i in parts):
                # as cupy's: out-of-bounds integer indices wrap around instead of raising (so
                # the read is safe until a deferred range check reports the index)
                idx = tuple(np.mod(i.view(np.ndarray), n) for i, n in zip(parts, self.shape))
            return dev(inside("gather" if fancy else None, super().__getitem__, idx))

        def __setitem__(self, idx, value):
            inside("setitem", super().__setitem__, idx, value)

        def copy(self, *a, **k):
            return dev(inside("copy", super().copy, *a, **k))

        def astype(self, *a, **k):
            return dev(inside("astype", super().astype, *a, **k))

        # what reads the device from the host (cupy synchronises for each)
        def get(self, *a, **k):
            counts.sync("get")
            return np.array(self.view(np.ndarray))

        def item(self, *a):
            counts.sync("item")
            return self.view(np.ndarray).item(*a)

        def tolist(self):
            counts.sync("tolist")
            return self.view(np.ndarray).tolist()

        def __float__(self):
            counts.sync("float")
            return float(self.view(np.ndarray))

        def __int__(self):
            counts.sync("int")
            return int(self.view(np.ndarray))

        def __bool__(self):
            counts.sync("bool")
            return bool(self.view(np.ndarray))

        def __index__(self):
            counts.sync("index")
            return self.view(np.ndarray).__index__()

    return Dev


def make_fake_cupy(lib, counting: bool = False):
    """A stand-in for the ``cupy`` module: NumPy arrays, host kernels, a NumPy gemm, streams
    whose capture records the kernel launches and nvmath GEMMs with the addresses they got.

    counting: the arrays are ``device_array_class`` instances and ``fake.counts`` (a
    DeviceCounts) records every host sync and device op of the code that uses them."""
    fake = types.SimpleNamespace()
    fake.counts = DeviceCounts() if counting else None
    Dev = device_array_class(fake.counts) if counting else None
    fake.lib, fake.launches, fake.modules, fake.gemms = lib, [], [], []
    fake.streams, fake.capturing, fake.captured, fake.launched = {}, None, [], []

    def submit(op, stream, name):
        if fake.capturing is not None and stream is not fake.capturing:
            raise RuntimeError(f"{name} issued on stream {stream.ptr} while stream "
                               f"{fake.capturing.ptr} captures: it would not be in the graph")
        if stream.ops is not None:
            stream.ops.append((name, op))
        else:
            op()

    fake.submit = submit
    fake.current = _FakeStream(fake, 0)
    # the stand-in device: 2 SMs, an H200's shared memory, `occupancy` blocks per SM
    fake.sms, fake.occupancy, fake.name = 2, 1, "stand-in GPU"

    class FakeCupy(types.ModuleType):
        def __getattr__(self, name):          # everything else is NumPy's
            f = getattr(np, name)
            if name in _ALLOCATORS:
                def alloc(*a, **k):
                    assert fake.capturing is None, f"cupy.{name} allocates during stream capture"
                    r = f(*a, **k)
                    return r if Dev is None or not isinstance(r, np.ndarray) else r.view(Dev)
                return alloc
            if Dev is not None and name == "asarray":
                def asarray(a, dtype=None):
                    if not isinstance(a, Dev):
                        fake.counts.uploads += 1     # a host array (or list) moved to the device
                    return np.asarray(a, dtype=dtype).view(Dev)
                return asarray
            return f

    mod = FakeCupy("cupy")
    mod.ndarray = np.ndarray
    def asnumpy(a):                           # a host copy, as cupy.asnumpy from a device
        if Dev is not None and isinstance(a, Dev):
            fake.counts.sync("asnumpy")
            return np.array(a.view(np.ndarray))
        return np.array(a)

    mod.asnumpy = asnumpy
    mod.RawModule = lambda **kw: _HostModule(fake, **kw)    # keyword-only, as cupy's
    mod.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0,
                                      getDeviceProperties=lambda i: {"name": fake.name.encode()}),
        driver=types.SimpleNamespace(
            occupancyMaxActiveBlocksPerMultiprocessor=lambda ptr, nt, smem: fake.occupancy),
        Device=lambda i=0: types.SimpleNamespace(attributes={
            "MultiProcessorCount": fake.sms, "MaxSharedMemoryPerBlockOptin": 232448,
            "MaxSharedMemoryPerMultiprocessor": 233472}),
        get_current_stream=lambda device_id=-1: fake.current,
        Stream=lambda null=False, non_blocking=False, ptds=False, priority=None:
            fake.streams[0] if null else _FakeStream(fake, max(max(fake.streams) + 1, 0x100)))

    def gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        # cupy.cublas.gemm's contract: out = alpha op(a) @ op(b) + beta out, operands C- or
        # F-contiguous 2-D (transposed views are passed to cuBLAS as flags)
        if fake.capturing is not None:      # cupy#6290: cupy's cuBLAS wrappers refuse capture
            raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
        assert (transa, transb) == ("N", "N") and out is not None
        for x in (a, b, out):
            assert x.ndim == 2 and (x.flags.c_contiguous or x.flags.f_contiguous)
        fake.gemms.append((a.shape, b.shape))
        if fake.counts is not None:
            fake.counts.op("cublas")        # one call; the host arithmetic below is not device ops
        A, B, C = (np.asarray(x).view(np.ndarray) for x in (a, b, out))
        C[...] = alpha * (A @ B) + beta * C
        return out

    mod.cublas = types.SimpleNamespace(gemm=gemm)
    fake.module = mod
    return fake


def _colmajor(ptr, rows, cols, ld, dtype):
    """The column-major matrix [rows, cols] with leading dimension ld at host address ptr."""
    assert rows >= 1 and cols >= 1 and ld >= rows, (rows, cols, ld)
    dt = np.dtype(dtype)
    n = ld * (cols - 1) + rows
    base = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(np.ctypeslib.as_ctypes_type(dt))), (n,))
    return np.lib.stride_tricks.as_strided(base, (rows, cols), (dt.itemsize, ld * dt.itemsize))


def make_fake_nvmath(fake):
    """A stand-in for ``nvmath.bindings.cublas``: handles with a stream and a workspace, and
    s/dgemm that compute the column-major BLAS contract on raw host addresses (so a wrong
    transpose flag, dimension, leading dimension or pointer gives a wrong result), run or
    recorded on the handle's stream like the kernels."""
    import enum

    handles = {}
    cublas = types.ModuleType("nvmath.bindings.cublas")
    cublas.Operation = enum.IntEnum("Operation", {"N": 0, "T": 1, "C": 2})
    cublas.PointerMode = enum.IntEnum("PointerMode", {"HOST": 0, "DEVICE": 1})

    def create():
        h = 1000 + len(handles)
        handles[h] = dict(stream=0, workspace=None, pointer_mode=0)
        return h

    # parameter names and order as nvmath-python 1.0's (tests/test_real_api.py compares them)
    def set_stream(handle, stream_id):
        assert stream_id in fake.streams, f"set_stream: {stream_id} is not a stream"
        handles[handle].update(stream=stream_id, workspace=None)   # cublasSetStream resets the workspace

    def set_workspace(handle, workspace, workspace_size_in_bytes):
        assert workspace and workspace_size_in_bytes > 0
        # (cuBLAS also needs it 256-byte aligned: cupy's pool gives 512; the stand-in's NumPy
        # buffer is not, so that is not checked here)
        handles[handle]["workspace"] = (workspace, workspace_size_in_bytes)

    def set_pointer_mode(handle, mode):
        handles[handle]["pointer_mode"] = int(mode)

    def destroy(handle):
        handles.pop(handle)

    def make_gemm(dtype):
        ctype = np.ctypeslib.as_ctypes_type(np.dtype(dtype))

        def g(handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
            st = handles[handle]
            assert st["pointer_mode"] == 0, "alpha/beta are host pointers"
            stream = fake.streams[st["stream"]]
            if fake.capturing is not None:
                assert st["workspace"] is not None, \
                    "cuBLAS without a user workspace (reset by set_stream) would allocate during capture"
            al = ctypes.cast(alpha, ctypes.POINTER(ctype))[0]   # host scalars: read at the call
            be = ctypes.cast(beta, ctypes.POINTER(ctype))[0]
            A = _colmajor(a, *((m, k) if transa == 0 else (k, m)), lda, dtype)
            B = _colmajor(b, *((k, n) if transb == 0 else (n, k)), ldb, dtype)
            C = _colmajor(c, m, n, ldc, dtype)

            def run():
                opA = A if transa == 0 else A.T
                opB = B if transb == 0 else B.T
                C[...] = al * (opA @ opB) + be * C

            fake.gemms.append(("nvmath", m, n, k))
            if fake.counts is not None:
                fake.counts.op("nvmath")
            fake.submit(run, stream, "gemm")
        return g

    # cublasGemmEx for the precision modes, with nvmath 1.0's enum names and the CUDA headers'
    # values (cublas_api.h, library_types.h; test_fake_nvmath_enums_are_the_real_ones)
    cublas.ComputeType = enum.IntEnum("ComputeType", {"COMPUTE_32F": 68, "COMPUTE_32F_FAST_TF32": 77,
                                                      "COMPUTE_64F": 70})
    cublas.GemmAlgo = enum.IntEnum("GemmAlgo", {"DEFAULT": -1, "DEFAULT_TENSOR_OP": 99})
    data_type = enum.IntEnum("CudaDataType", {"CUDA_R_32F": 0, "CUDA_R_64F": 1, "CUDA_R_16BF": 14})
    fake.gemm_ex_calls = []

    def gemm_ex(handle, transa, transb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c, ctype, ldc,
                compute_type, algo):    # nvmath 1.0's parameter names (checked against the real one)
        # the column-major contract on raw host addresses: bf16 operands are uint16 bits, TF32
        # compute rounds both operands to nearest even (what the NumPy emulation does)
        from xlstm.precision import round_tf32

        h, compute = handle, compute_type
        st = handles[h]
        assert st["pointer_mode"] == 0, "alpha/beta are host pointers"
        assert ctype == data_type.CUDA_R_32F and atype == btype and algo == cublas.GemmAlgo.DEFAULT
        assert compute == (cublas.ComputeType.COMPUTE_32F_FAST_TF32 if atype == data_type.CUDA_R_32F
                           else cublas.ComputeType.COMPUTE_32F), (atype, compute)
        stream = fake.streams[st["stream"]]
        if fake.capturing is not None:
            assert st["workspace"] is not None, \
                "cuBLAS without a user workspace (reset by set_stream) would allocate during capture"
        fake.gemm_ex_calls.append(dict(transa=transa, transb=transb, m=m, n=n, k=k, Atype=atype,
                                       compute=compute, stream=st["stream"]))
        dt = {data_type.CUDA_R_32F: np.float32, data_type.CUDA_R_16BF: np.uint16}[atype]
        al = ctypes.cast(alpha, ctypes.POINTER(ctypes.c_float))[0]
        be = ctypes.cast(beta, ctypes.POINTER(ctypes.c_float))[0]
        A = _colmajor(a, *((m, k) if transa == 0 else (k, m)), lda, dt)
        B = _colmajor(b, *((k, n) if transb == 0 else (n, k)), ldb, dt)
        C = _colmajor(c, m, n, ldc, np.float32)

        def value(X):
            if dt == np.uint16:
                return (X.astype(np.uint32) << 16).view(np.float32)
            return round_tf32(np.ascontiguousarray(X))

        def run():
            opA = value(A) if transa == 0 else value(A).T
            opB = value(B) if transb == 0 else value(B).T
            prod = opA.astype(np.float64) @ opB
            C[...] = (al * prod + (be * C if be != 0 else 0)).astype(np.float32)

        fake.gemms.append(("nvmath_ex", m, n, k))
        fake.submit(run, stream, "gemm_ex")

    cublas.create, cublas.destroy, cublas.set_stream = create, destroy, set_stream
    cublas.set_workspace, cublas.set_pointer_mode = set_workspace, set_pointer_mode
    cublas.sgemm, cublas.dgemm = make_gemm(np.float32), make_gemm(np.float64)
    cublas.gemm_ex = gemm_ex
    nvmath = types.ModuleType("nvmath")
    nvmath.CudaDataType = data_type
    bindings = types.ModuleType("nvmath.bindings")
    bindings.cublas, nvmath.bindings = cublas, bindings
    fake.cublas_handles = handles
    return {"nvmath": nvmath, "nvmath.bindings": bindings, "nvmath.bindings.cublas": cublas}


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return kernels_host_lib.build_or_skip(tmp_path_factory, "host_kernels_cupy")


def install_fakes(host_lib, monkeypatch, nvmath: bool, counting: bool = False):
    """Puts the stand-in cupy (and, with ``nvmath``, the stand-in nvmath cuBLAS binding; else
    none, so the backend uses cupy's cuBLAS and the eager loop) in sys.modules; returns the
    stand-in's records (with ``counting``: ``fake.counts``, see DeviceCounts)."""
    from xlstm.backends import cublas_gemm

    fake = make_fake_cupy(host_lib, counting)
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    if counting:        # backend_of(a stand-in device array) is one CupyBackend on the stand-in
        from xlstm import backends
        from xlstm.backends.cupy_backend import CupyBackend
        fake.backend = None

        def cupy_backend():
            if fake.backend is None:
                fake.backend = CupyBackend()
            return fake.backend
        monkeypatch.setattr(backends, "_cupy_backend", cupy_backend)
    if not nvmath:
        monkeypatch.setitem(sys.modules, "nvmath", None)
        return fake
    for name, mod in make_fake_nvmath(fake).items():
        monkeypatch.setitem(sys.modules, name, mod)
    # the stand-in's "device" arrays are NumPy's: their address is the host address
    monkeypatch.setattr(cublas_gemm, "_ptr", lambda a: a.ctypes.data)
    return fake


@pytest.fixture
def emulated(host_lib, monkeypatch):
    """(CupyBackend running on the host, the fake module's records)."""
    from xlstm.backends.cupy_backend import CupyBackend

    fake = install_fakes(host_lib, monkeypatch, nvmath=False)
    return CupyBackend(), fake


# -- shared by the emulated and the GPU tests -------------------------------------------------
MODS = ["plain", "mask", "zoneout", "dropout", "all"]


def step_inputs(rng, B, H, dt, kind):
    z = (rng.standard_normal((B, 4 * H)) * 2).astype(dt)
    c_prev = (rng.standard_normal((B, H)) * 2).astype(dt)
    h_prev = rng.uniform(-1, 1, (B, H)).astype(dt)
    mask = zc = zh = gm = None
    if kind in ("mask", "all"):
        mask = (rng.random(B) < 0.5).astype(dt)
        mask[0] = 0
    if kind in ("zoneout", "all"):
        zc = (rng.random((B, H)) < 0.3).astype(dt)
        zh = (rng.random((B, H)) < 0.3).astype(dt)
    if kind in ("dropout", "all"):
        gm = ((rng.random((B, H)) < 0.75) / 0.75).astype(dt)
    grads = tuple(rng.standard_normal((B, H)).astype(dt) for _ in range(3))
    return z, c_prev, h_prev, (mask, zc, zh, gm), grads


def compare_steps(be, dt, B, H, kind, seed=0):
    """Plain and LayerNorm steps, forward and backward, on ``be`` against NumpyBackend."""
    rng = np.random.default_rng([seed, B, H, MODS.index(kind)])
    nb = NumpyBackend()
    z, c_prev, h_prev, mods, (dy, dh_next, dc_next) = step_inputs(rng, B, H, dt, kind)
    on = lambda *arrays: [None if a is None else be.asarray(a) for a in arrays]  # noqa: E731
    back = be.to_numpy
    dmods = on(*mods)

    # plain forward
    zn, cn, hn = z.copy(), np.empty_like(c_prev), np.empty_like(h_prev)
    nb.lstm_forward_step(zn, c_prev, h_prev, cn, hn, 1.0, *mods)
    zd, cpd, hpd = on(z, c_prev, h_prev)
    cd, hd = be.xp.empty((B, H), dt), be.xp.empty((B, H), dt)
    be.lstm_forward_step(zd, cpd, hpd, cd, hd, 1.0, *dmods)
    for what, g, w in (("gates", zd, zn), ("c", cd, cn), ("h", hd, hn)):
        assert_close(f"forward {what} [{kind}]", back(g), w, dt)

    # plain backward, with the layer's aliasing (dc_prev is dc_next, dh_skip is dh_next)
    gates = zn
    dzn, dcn, dhn = np.empty_like(z), dc_next.copy(), dh_next.copy()
    nb.lstm_backward_step(gates, c_prev, dy, dhn, dcn, dzn, dcn, dhn, *mods)
    gd, dyd, dhd, dcd = on(gates, dy, dh_next, dc_next)
    dzd = be.xp.empty((B, 4 * H), dt)
    be.lstm_backward_step(gd, cpd, dyd, dhd, dcd, dzd, dcd, dhd, *dmods)
    for what, g, w in (("dz", dzd, dzn), ("dc_prev", dcd, dcn), ("dh_skip", dhd, dhn)):
        assert_close(f"backward {what} [{kind}]", back(g), w, dt)

    # LayerNorm forward and backward (accumulators start non-zero: the step adds)
    gain = (1 + 0.3 * rng.standard_normal(4 * H)).astype(dt)
    shift = (0.2 * rng.standard_normal(4 * H)).astype(dt)
    c_gain = (1 + 0.3 * rng.standard_normal(H)).astype(dt)
    c_shift = (0.2 * rng.standard_normal(H)).astype(dt)
    eps = 1e-5
    outs_n = [z.copy(), np.empty_like(z), np.empty((B, 4), dt), np.empty_like(c_prev), np.empty(B, dt),
              np.empty_like(c_prev), np.empty_like(c_prev)]
    nb.ln_lstm_forward_step(outs_n[0], outs_n[1], outs_n[2], outs_n[3], outs_n[4], c_prev, h_prev,
                            outs_n[5], outs_n[6], gain, shift, c_gain, c_shift, 1.0, eps, *mods)
    outs_d = on(z) + [be.xp.empty(o.shape, dt) for o in outs_n[1:]]
    pd = on(gain, shift, c_gain, c_shift)
    be.ln_lstm_forward_step(outs_d[0], outs_d[1], outs_d[2], outs_d[3], outs_d[4], cpd, hpd,
                            outs_d[5], outs_d[6], *pd, 1.0, eps, *dmods)
    for what, g, w in zip(("gates", "zhat", "rstd", "chat", "rstd_c", "c", "h"), outs_d, outs_n):
        assert_close(f"LN forward {what} [{kind}]", back(g), w, dt)

    acc0 = [rng.standard_normal(n).astype(dt) for n in (4 * H, 4 * H, H, H)]
    accn = [a.copy() for a in acc0]
    dzn, dcn, dhn = np.empty_like(z), dc_next.copy(), dh_next.copy()
    g_n, zh_n, rs_n, ch_n, rc_n = outs_n[:5]
    nb.ln_lstm_backward_step(g_n, zh_n, rs_n, ch_n, rc_n, c_prev, gain, c_gain, c_shift, dy, dhn,
                             dcn, dzn, dcn, dhn, *accn, *mods)
    accd = on(*acc0)
    dhd, dcd = on(dh_next, dc_next)
    dzd = be.xp.empty((B, 4 * H), dt)
    stored = on(g_n, zh_n, rs_n, ch_n, rc_n)
    be.ln_lstm_backward_step(*stored, cpd, pd[0], pd[2], pd[3], dyd, dhd, dcd, dzd, dcd, dhd,
                             *accd, *dmods)
    for what, g, w in zip(("dz", "dc_prev", "dh_skip", "dgain", "dshift", "dc_gain", "dc_shift"),
                          [dzd, dcd, dhd, *accd], [dzn, dcn, dhn, *accn]):
        assert_close(f"LN backward {what} [{kind}]", back(g), w, dt)


# Full-model configurations: (name, LSTM keyword arguments, use lengths)
CONFIGS = [
    ("1 layer", dict(num_layers=1), False),
    ("2 layers", dict(num_layers=2), False),
    ("bidirectional", dict(num_layers=1, bidirectional=True), False),
    ("2 layers bidirectional lengths", dict(num_layers=2, bidirectional=True), True),
    ("zoneout + recurrent dropout, lengths", dict(num_layers=2, bidirectional=True, zoneout=0.2,
                                                  recurrent_dropout=0.25), True),
    ("layer norm", dict(num_layers=1, layer_norm=True), False),
    ("layer norm 2 layers bidirectional, zoneout + dropout, lengths",
     dict(num_layers=2, bidirectional=True, layer_norm=True, zoneout=0.15, recurrent_dropout=0.2), True),
]
CONFIG_IDS = [c[0].replace(" ", "_").replace(",", "") for c in CONFIGS]


def compare_models(backend, dtype, kwargs, use_lengths, T=6, B=3, D=5, H=33, seed=5):
    """A model on NumPy and its copy on ``backend``: every output, state, dx and gradient."""
    rng = np.random.default_rng(seed)
    ref = xlstm.LSTM(D, H, dtype=dtype, seed=seed, backend="numpy", **kwargs)
    dev = xlstm.LSTM(D, H, dtype=dtype, seed=seed, backend=backend, **kwargs)
    dev.load_state_dict(ref.state_dict())
    S = (ref.num_layers * ref.num_directions, B, H)
    x = rng.standard_normal((T, B, D)).astype(dtype)
    h0, c0 = (rng.standard_normal(S).astype(dtype) * 0.5 for _ in range(2))
    lengths = np.array([T, max(1, T - 2), 1][:B]) if use_lengths else None
    dirs = ref.num_directions
    dy = rng.standard_normal((T, B, H * dirs)).astype(dtype)
    dhn, dcn = (rng.standard_normal(S).astype(dtype) for _ in range(2))

    y, (hn, cn) = ref.forward(x, state=(h0, c0), lengths=lengths)
    be = dev.backend
    masks = {k: tuple(None if m is None else be.asarray(ref.backend.to_numpy(m)) for m in v)
             for k, v in ref.last_masks.items()}          # the very masks the NumPy run drew
    y2, (hn2, cn2) = dev.forward(be.asarray(x), state=(be.asarray(h0), be.asarray(c0)),
                                 lengths=lengths, masks=masks)
    dx, (dh0, dc0) = ref.backward(dy, dstate=(dhn, dcn))
    dx2, (dh02, dc02) = dev.backward(be.asarray(dy), dstate=(be.asarray(dhn), be.asarray(dcn)))
    be.synchronize()
    for what, g, w in (("y", y2, y), ("h_n", hn2, hn), ("c_n", cn2, cn), ("dx", dx2, dx),
                       ("dh0", dh02, dh0), ("dc0", dc02, dc0)):
        assert_close(what, be.to_numpy(g), w, dtype)
    assert set(dev.grads) == set(ref.grads)
    for k in ref.grads:
        assert_close(f"grad {k}", be.to_numpy(dev.grads[k]), ref.grads[k], dtype)


# -- the emulated tests -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (4, 33)])
def test_emulated_steps_match_numpy(emulated, dtype, kind, B, H):
    be, fake = emulated
    compare_steps(be, np.dtype(dtype).type, B, H, kind)
    assert fake.launches, "no kernel was launched"


@pytest.mark.parametrize("persistent", ["off", "on"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", CONFIGS, ids=CONFIG_IDS)
def test_emulated_models_match_numpy(emulated, dtype, name, kwargs, use_lengths, persistent):
    be, fake = emulated
    be.persistent = persistent
    compare_models(be, dtype, kwargs, use_lengths)
    assert fake.gemms, "matmul_add did not reach cuBLAS's gemm"
    if not kwargs.get("layer_norm"):
        ran = {n for n in fake.launches if n.startswith("lstm_persistent")}
        assert bool(ran) == (persistent == "on"), f"persistent={persistent}, launched {sorted(set(fake.launches))}"


def test_emulated_module_is_the_kernel_source(emulated):
    from xlstm.kernels import kernel_source

    be, fake = emulated
    rng = np.random.default_rng(0)
    z, c_prev, h_prev, _, _ = step_inputs(rng, 2, 3, np.float32, "plain")
    c, h = np.empty_like(c_prev), np.empty_like(h_prev)
    be.lstm_forward_step(z, c_prev, h_prev, c, h, 1.0)
    be.lstm_forward_step(z, c_prev, h_prev, c, h, 1.0)
    assert len(fake.modules) == 1, "the module must be compiled once, not per step"
    code, options = fake.modules[0]
    assert code == kernel_source() and "-std=c++17" in options
    assert fake.launches == ["lstm_forward_step_f32"] * 2


def test_emulated_launches_per_step(emulated):
    """Per time step: one recurrent GEMM and one fused kernel, forward and backward."""
    be, fake = emulated
    be.persistent = "off"
    T = 4
    m = xlstm.LSTM(3, 4, backend=be, seed=0)
    x = np.random.default_rng(0).standard_normal((T, 2, 3)).astype(np.float32)
    fake.launches.clear()
    fake.gemms.clear()
    y, _ = m.forward(x)
    assert fake.launches == ["lstm_forward_step_f32"] * T and len(fake.gemms) == T
    fake.launches.clear()
    fake.gemms.clear()
    m.backward(np.ones_like(y))
    assert fake.launches == ["lstm_backward_step_f32"] * T
    assert len(fake.gemms) == T + 2                     # + dW and dU after the loop


def test_emulated_bad_arguments_are_named(emulated):
    be, _ = emulated
    z = np.zeros((2, 8), np.float32)
    c_prev = np.zeros((2, 2), np.float32)
    c, h = np.zeros_like(c_prev), np.zeros_like(c_prev)
    with pytest.raises(InputError, match="h_prev.*dtype"):
        be.lstm_forward_step(z, c_prev, c_prev.astype(np.float64), c, h, 1.0)
    with pytest.raises(InputError, match="c_prev.*C-contiguous"):
        be.lstm_forward_step(z, np.zeros((2, 4), np.float32)[:, ::2], c_prev, c, h, 1.0)
    with pytest.raises(InputError, match=r"mask has shape \(3,\)"):
        be.lstm_forward_step(z, c_prev, c_prev, c, h, 1.0, mask=np.ones(3, np.float32))
    with pytest.raises(InputError, match="float32 or float64"):
        be.lstm_forward_step(z.astype(np.float16), c_prev.astype(np.float16), c_prev.astype(np.float16),
                             c.astype(np.float16), h.astype(np.float16), 1.0)


def test_to_numpy_copy_of_a_host_array_owns_its_memory():
    """copy=True is a snapshot also when a host array reaches the CuPy backend: the real
    ``cupy.asnumpy`` (no device needed for this) returns a NumPy array itself."""
    pytest.importorskip("cupy")
    from xlstm.backends.cupy_backend import CupyBackend

    be = CupyBackend()
    a = np.arange(4.0)
    assert be.to_numpy(a) is a
    kept = be.to_numpy(a, copy=True)
    a += 1
    np.testing.assert_array_equal(kept, np.arange(4.0))


def language_model_step(backend, dtype, grad_method, layer_norm, seed=3, V=13, E=6, H=10, T=7, B=4):
    """One training step's gradients of Embedding -> LSTM -> Dense -> cross-entropy, with
    ids that repeat (a third of them one id), on ``backend``; host copies by name."""
    from xlstm.layers import Dense, Embedding, Sequential
    from xlstm.losses import cross_entropy

    rng = np.random.default_rng(seed)
    model = Sequential(Embedding(V, E, dtype=dtype, seed=seed, backend=backend, grad_method=grad_method),
                       xlstm.LSTM(E, H, layer_norm=layer_norm, dtype=dtype, seed=seed, backend=backend),
                       Dense(H, V, dtype=dtype, seed=seed, backend=backend))
    ids = rng.integers(0, V, (T, B))
    ids.flat[rng.permutation(T * B)[: T * B // 3]] = 2
    targets = rng.integers(0, V, (T, B))
    be = model.backend
    logits = model.forward(be.asarray(ids))
    loss, dlogits = cross_entropy(logits, be.asarray(targets))
    model.backward(dlogits)
    be.synchronize()
    return loss, {k: be.to_numpy(g, copy=True) for k, g in model.grads.items()}


class _NoAddAt:
    """np.add, except that ``add.at`` (atomicAdd in CuPy: run-to-run different sums) fails."""

    def __call__(self, *a, **kw):
        return np.add(*a, **kw)

    def at(self, *a, **kw):
        raise AssertionError("xp.add.at on the training path: CuPy runs it with atomics (issue 9)")


@pytest.mark.parametrize("grad_method", ["auto", "sort", "onehot"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_emulated_training_gradients_match_numpy_without_atomics(emulated, monkeypatch, grad_method, layer_norm):
    """The language model's gradients through the CuPy backend equal the NumPy backend's, and
    the embedding's scatter-add takes no ``add.at``; "auto" is the one-hot GEMM for a small
    vocabulary (no argsort)."""
    be, fake = emulated
    monkeypatch.setattr(fake.module, "add", _NoAddAt(), raising=False)
    if grad_method == "auto":
        monkeypatch.setattr(fake.module, "argsort", lambda *a, **k: pytest.fail("auto sorted a small vocabulary"),
                            raising=False)
    loss, grads = language_model_step(be, "float64", grad_method, layer_norm)
    ref_loss, ref = language_model_step("numpy", "float64", grad_method, layer_norm)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert grads.keys() == ref.keys()
    for k in ref:
        assert_close(f"grad {k}", grads[k], ref[k], "float64")


# =============================================================================================
# 3. On a GPU
# =============================================================================================
@pytest.fixture
def cupy_be():
    return resolve("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (4, 33), (16, 256), (5, 1000)])
def test_gpu_steps_match_numpy(cupy_be, dtype, kind, B, H):
    compare_steps(cupy_be, np.dtype(dtype).type, B, H, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", CONFIGS, ids=CONFIG_IDS)
def test_gpu_models_match_numpy(cupy_be, dtype, name, kwargs, use_lengths):
    compare_models(cupy_be, dtype, kwargs, use_lengths)


@pytest.mark.gpu
def test_gpu_module_to_cupy_and_back():
    m = xlstm.LSTM(4, 8, num_layers=2, bidirectional=True, dtype="float64", seed=1, backend="numpy")
    x = np.random.default_rng(1).standard_normal((5, 2, 4))
    y, _ = m.forward(x)
    m.to("cupy")
    assert m.backend.name == "cupy" and type(m.params["l0.W"]).__module__.startswith("cupy")
    y2, _ = m.forward(x)                                 # NumPy input moved to the device
    assert_close("y after to('cupy')", m.backend.to_numpy(y2), y, "float64")
    m.to("numpy")
    y3, _ = m.forward(x)
    assert_close("y after to('numpy')", y3, y, "float64")


@pytest.mark.gpu
def test_gpu_bad_layout_raises():
    be = resolve("cupy")
    cp = be.xp
    z = cp.zeros((2, 8), cp.float32)
    c_prev = cp.zeros((2, 2), cp.float32)
    with pytest.raises(InputError, match="C-contiguous"):
        be.lstm_forward_step(z, cp.zeros((2, 4), cp.float32)[:, ::2], c_prev, c_prev.copy(),
                             c_prev.copy(), 1.0)


# -- the persistent kernels' launches (the stand-in runs their host schedule) -------------------
def sequence_inputs(rng, T, B, H, dt, kind):
    """Inputs of the sequence ops: gates (x@W+b), U, h0, c0, dy, dh_n, dc_n and the masks."""
    gates = (rng.standard_normal((T, B, 4 * H)) * 1.5).astype(dt)
    U = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(dt)
    h0, c0 = rng.uniform(-1, 1, (B, H)).astype(dt), rng.standard_normal((B, H)).astype(dt)
    dy = rng.standard_normal((T, B, H)).astype(dt)
    dh_n, dc_n = rng.standard_normal((B, H)).astype(dt), rng.standard_normal((B, H)).astype(dt)
    mask = zc = zh = gm = None
    if kind in ("mask", "all"):
        mask = (np.arange(T)[:, None] < rng.integers(0, T + 1, B)[None, :]).astype(dt)
    if kind in ("zoneout", "all"):
        zc = (rng.random((T, B, H)) < 0.3).astype(dt)
        zh = (rng.random((T, B, H)) < 0.3).astype(dt)
    if kind in ("dropout", "all"):
        gm = ((rng.random((T, B, H)) < 0.75) / 0.75).astype(dt)
    return gates, U, h0, c0, dy, dh_n, dc_n, (mask, zc, zh, gm)


def compare_sequences(be, dt, T, B, H, kind, seed=0, tol=None):
    """be.persistent_lstm_*_sequence against NumpyBackend's sequence ops, every output.

    Returns the device's (hs, dz, dh0) on the host, for the repeatability check."""
    rng = np.random.default_rng([seed, T, B, H, MODS.index(kind)])
    gates, U, h0, c0, dy, dh_n, dc_n, mods = sequence_inputs(rng, T, B, H, dt, kind)
    nb = NumpyBackend()
    on = lambda *arrays: [None if a is None else be.asarray(a) for a in arrays]  # noqa: E731
    dmods = on(*mods)

    gn, hn, cn = gates.copy(), np.empty((T + 1, B, H), dt), np.empty((T + 1, B, H), dt)
    hn[0], cn[0] = h0, c0
    nb.lstm_forward_sequence(gn, hn, cn, U, 1.0, *mods)
    gd, hd, cd, Ud = on(gates, hn * 0, cn * 0, U)
    hd[0], cd[0] = be.asarray(h0), be.asarray(c0)
    be.persistent_lstm_forward_sequence(gd, hd, cd, Ud, 1.0, *dmods)
    for what, g, w in (("gates", gd, gn), ("hs", hd, hn), ("cs", cd, cn)):
        assert_close(f"persistent forward {what} [{kind}]", be.to_numpy(g), w, dt, tol)

    UT = np.ascontiguousarray(U.T)
    dzn, dhr, dcr = np.empty_like(gates), dh_n.copy(), dc_n.copy()
    nb.lstm_backward_sequence(gn, cn, dy, dhr, dcr, dzn, UT, *mods)
    gd, cd, dyd, dhd, dcd, UTd = on(gn, cn, dy, dh_n, dc_n, UT)
    dzd = be.xp.empty((T, B, 4 * H), dt)
    be.persistent_lstm_backward_sequence(gd, cd, dyd, dhd, dcd, dzd, UTd, *dmods)
    for what, g, w in (("dz", dzd, dzn), ("dh0", dhd, dhr), ("dc0", dcd, dcr)):
        assert_close(f"persistent backward {what} [{kind}]", be.to_numpy(g), w, dt, tol)
    return be.to_numpy(hd), be.to_numpy(dzd), be.to_numpy(dhd)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("sms,T,B,H", [(1, 3, 2, 5), (3, 4, 3, 7), (64, 3, 5, 33), (2, 2, 2, 64)])
def test_emulated_persistent_sequences_match_numpy(emulated, dtype, kind, sms, T, B, H):
    be, fake = emulated
    fake.sms = sms                         # the grid: at most one block per SM
    compare_sequences(be, np.dtype(dtype).type, T, B, H, kind)
    sfx = "f64" if dtype == "float64" else "f32"
    assert fake.launches == [f"lstm_persistent_forward_{sfx}", f"lstm_persistent_backward_{sfx}"]
    code, _ = fake.modules[-1]
    from xlstm.kernels import PERSISTENT_SOURCE, kernel_source
    assert code == kernel_source(PERSISTENT_SOURCE)


def test_emulated_persistent_large_smem_sets_the_attribute(emulated):
    """Above 48 KB of shared memory the launch raises the kernel's opt-in attribute first."""
    be, fake = emulated
    fake.sms = 2                           # H=64 over 2 blocks: 32 units, ~75 KB in float64
    plan = be.persistent_plan(2, 64, np.float64)
    assert plan.smem_forward > 48 * 1024
    compare_sequences(be, np.float64, 2, 2, 64, "plain")


def test_emulated_persistent_refuses_what_does_not_fit(emulated):
    from xlstm.backends.persistent import PersistentUnfit

    be, fake = emulated
    rng = np.random.default_rng(0)
    T, B, H = 2, 2, 8
    gates, U, h0, c0, *_ = sequence_inputs(rng, T, B, H, np.float32, "plain")
    hs, cs = np.zeros((T + 1, B, H), np.float32), np.zeros((T + 1, B, H), np.float32)
    fake.occupancy = 0                     # the driver says: not one block fits an SM
    with pytest.raises(PersistentUnfit, match="not co-resident"):
        be.persistent_lstm_forward_sequence(gates.copy(), hs, cs, U, 1.0)
    be.persistent = "on"                   # forced: the refusal reaches the caller
    with pytest.raises(PersistentUnfit):
        be.lstm_forward_sequence(gates.copy(), hs, cs, U, 1.0)
    be.persistent = "auto"                 # auto: falls back to the per-step loop
    fake.launches.clear()
    g = gates.copy()
    be.lstm_forward_sequence(g, hs, cs, U, 1.0)
    assert be.last_path == "per-step" and fake.launches == ["lstm_forward_step_f32"] * T
    # U's slice too large for shared memory: float64, H=4096 over 2 blocks
    with pytest.raises(PersistentUnfit, match="shared memory"):
        be.persistent_plan(4, 4096, np.float64)


def test_emulated_persistent_bad_arguments_are_named(emulated):
    be, _ = emulated
    T, B, H = 2, 2, 3
    g = np.zeros((T, B, 4 * H), np.float32)
    hs = np.zeros((T + 1, B, H), np.float32)
    U = np.zeros((H, 4 * H), np.float32)
    with pytest.raises(InputError, match="U has dtype"):
        be.persistent_lstm_forward_sequence(g, hs, hs.copy(), U.astype(np.float64), 1.0)
    with pytest.raises(InputError, match=r"mask has shape \(2,\)"):
        be.persistent_lstm_forward_sequence(g, hs, hs.copy(), U, 1.0, mask=np.ones(B, np.float32))
    with pytest.raises(InputError, match=r"UT has shape"):
        be.persistent_lstm_backward_sequence(g, hs, hs[1:].copy(), hs[0].copy(), hs[0].copy(), g.copy(), U)


def test_persistent_picker(monkeypatch):
    from xlstm.backends import persistent as P

    assert not P.CROSSOVER_MEASURED        # the table is a guess until a GPU run replaces it
    assert P.crossover("NVIDIA H200") is P.CROSSOVER["H200"]
    assert P.crossover("Tesla T4") is P.CROSSOVER[""]
    assert P.choose("auto", B=64, H=64, device_name="NVIDIA H200")
    assert not P.choose("auto", B=64, H=1024, device_name="NVIDIA H200")
    assert not P.choose("auto", B=512, H=64, device_name="NVIDIA H200")
    assert P.choose("on", B=512, H=4096, device_name="x") and not P.choose("off", B=1, H=1, device_name="x")
    monkeypatch.setenv("XLSTM_PERSISTENT", "off")
    assert P.mode_from_env() == "off"
    monkeypatch.setenv("XLSTM_PERSISTENT", "sometimes")
    with pytest.raises(InputError, match="XLSTM_PERSISTENT"):
        P.mode_from_env()
    with pytest.raises(InputError, match="persistent mode"):
        P.choose("yes", B=1, H=1, device_name="x")


def test_persistent_plan_on_an_h200():
    """What fits an H200 (132 SMs, 227 KB a block): float32 up to H=1024, float64 below it."""
    from xlstm.backends.persistent import PersistentUnfit, plan

    h200 = dict(sm_count=132, smem_per_block=232448, smem_per_sm=233472)
    p = plan(64, 1024, 4, **h200)
    # 8 units a block x 16 row groups of 4 = 128 work items: 256 threads, a K-split of 2
    assert (p.NB, p.nt, p.KS) == (128, 256, 2) and max(p.smem_forward, p.smem_backward) <= 232448
    p = plan(16, 64, 4, **h200)            # 4 work items: the K-split stops at sqrt(H) = 8
    assert (p.NB, p.nt, p.KS) == (64, 256, 8)
    p = plan(64, 1280, 4, **h200)          # 10 units x 16 row groups: 160 items
    assert (p.NB, p.nt, p.KS) == (128, 256, 1)
    plan(64, 768, 8, **h200)
    with pytest.raises(PersistentUnfit, match="shared memory"):
        plan(64, 1024, 8, **h200)


# -- persistent kernels on a GPU ----------------------------------------------------------------
# the bar: float64 to 1e-12 against NumPy (float32 as the other device tests, 1e-5)
PERSISTENT_TOL = {"float64": 1e-12, "float32": 1e-5}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("T,B,H", [(3, 2, 5), (8, 3, 33), (16, 16, 64), (8, 64, 256), (4, 16, 1000)])
def test_gpu_persistent_sequences_match_numpy(cupy_be, dtype, kind, T, B, H):
    from xlstm.backends.persistent import PersistentUnfit

    try:
        cupy_be.persistent_plan(B, H, dtype)
    except PersistentUnfit as e:
        if H < 1000:                       # every smaller shape fits any sm_80+ device: a refusal is a bug
            raise
        pytest.skip(f"does not fit this device: {e}")   # float64 at H=1000 on an H200 (see the plan test)
    compare_sequences(cupy_be, np.dtype(dtype).type, T, B, H, kind, tol=PERSISTENT_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_persistent_is_bitwise_repeatable(cupy_be, dtype):
    dt = np.dtype(dtype).type
    first = compare_sequences(cupy_be, dt, 12, 16, 256, "all", seed=3, tol=PERSISTENT_TOL)
    for _ in range(2):
        again = compare_sequences(cupy_be, dt, 12, 16, 256, "all", seed=3, tol=PERSISTENT_TOL)
        assert all(np.array_equal(a, b) for a, b in zip(first, again)), "persistent results differ between runs"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", [c for c in CONFIGS if not c[1].get("layer_norm")],
                         ids=[i for c, i in zip(CONFIGS, CONFIG_IDS) if not c[1].get("layer_norm")])
def test_gpu_persistent_models_match_numpy(dtype, name, kwargs, use_lengths):
    be = resolve("cupy")
    old = be.persistent
    be.persistent = "on"
    try:
        compare_models(be, dtype, kwargs, use_lengths)
        assert be.last_path == "persistent"
    finally:
        be.persistent = old


@pytest.mark.gpu
def test_gpu_persistent_refuses_an_oversized_grid():
    """A plan whose blocks are not co-resident is refused before launch (no hang)."""
    import dataclasses

    from xlstm.backends.persistent import PersistentUnfit

    be = resolve("cupy")
    cp = be.xp
    T, B, H = 2, 2, 64
    name, sms, per_block, per_sm = be.device_info()
    plan = be.persistent_plan(B, H, np.float32)
    big = dataclasses.replace(plan, NB=sms * 64, smem_forward=per_block)   # more than the device holds
    with pytest.raises(PersistentUnfit, match="not co-resident"):
        be._launch_persistent("lstm_persistent_forward", cp.float32, (), T, B, H, plan=big)


def test_emulated_persistent_empty_sequence_launches_nothing(emulated):
    be, fake = emulated
    B, H = 2, 3
    g = np.zeros((0, B, 4 * H), np.float32)
    hs = np.ones((1, B, H), np.float32)
    dh, dc = np.ones((B, H), np.float32), np.ones((B, H), np.float32)
    be.persistent_lstm_forward_sequence(g, hs, hs.copy(), np.zeros((H, 4 * H), np.float32), 1.0)
    be.persistent_lstm_backward_sequence(g, hs, g[..., :H], dh, dc, g.copy(), np.zeros((4 * H, H), np.float32))
    assert fake.launches == [] and (dh == 1).all() and (dc == 1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("grad_method", ["auto", "sort", "onehot"])
@pytest.mark.parametrize("V,N", [(97, 4096), (5000, 4096)])
def test_gpu_embedding_gradient_is_bitwise_repeatable(cupy_be, grad_method, V, N):
    """The embedding gradient on the device: equal to np.add.at (float64 1e-12) and the same
    bits on every repetition (the add.at it replaced is not: atomics)."""
    from xlstm.layers import scatter_add_rows

    cp = cupy_be.xp
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, N)
    ids[: N // 4] = 1                                   # a long segment, as a space in text
    ids = rng.permutation(ids)
    rows = rng.standard_normal((N, 64))
    ref = np.zeros((V, 64))
    np.add.at(ref, ids, rows)
    d_ids, d_rows = cp.asarray(ids), cp.asarray(rows.astype(np.float32))
    first = None
    for _ in range(5):
        out = cp.zeros((V, 64), cp.float32)
        scatter_add_rows(cp, out, d_ids, d_rows, grad_method)
        got = cp.asnumpy(out)
        if first is None:
            first = got
        assert np.array_equal(got, first), "float32 sums differ between identical calls"
    out64 = cp.zeros((V, 64), cp.float64)
    scatter_add_rows(cp, out64, d_ids, cp.asarray(rows), grad_method)
    np.testing.assert_allclose(cp.asnumpy(out64), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("layer_norm", [False, True])
def test_gpu_training_gradients_are_bitwise_repeatable(cupy_be, layer_norm):
    """A whole language-model step on the device, three times: the same loss and gradient bits."""
    runs = [language_model_step(cupy_be, "float32", "auto", layer_norm, V=97, E=32, H=64, T=32, B=16)
            for _ in range(3)]
    for loss, grads in runs[1:]:
        assert loss == runs[0][0]
        assert all(np.array_equal(grads[k], runs[0][1][k]) for k in grads), \
            [k for k in grads if not np.array_equal(grads[k], runs[0][1][k])]
