"""A stand-in ``cupy`` (and nvmath's cuBLAS binding) whose kernels are the host builds of the CUDA sources.

``make_fake_cupy(lib)`` returns a module object whose ``RawModule`` launches the host twins of the
kernels (``support/kernels_host_shim.cpp``) after checking each launch against the kernel's C
signature, and whose arrays are an ndarray subclass exposing ``.data.ptr`` as cupy's do. Its
streams capture launches and GEMMs (with the addresses they were given) for ``Graph.launch`` to
replay; any other cupy operation inside a capture raises ``CaptureViolation``. ``make_fake_nvmath`` stands in for
``nvmath.bindings.cublas``. ``install_fakes`` puts both in ``sys.modules``; the fixtures of
``tests/conftest.py`` (``host_lib``, ``emulated``, ``standin``) are the way tests reach it.
"""
from __future__ import annotations

import ctypes
import sys
import types

import numpy as np

from support import kernels_host as kernels_host_lib


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
            raise CaptureViolation("stream synchronize during stream capture (the device would be waited on)")
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


class CaptureViolation(BaseException):
    """Work that a real stream capture would record (or refuse) ran at once on the host: a cupy
    ufunc, setitem, copy, reduction, allocation or host read inside a captured region, which
    would vanish from the replay. A BaseException, so that the backend's capture fallback
    (``except Exception``: run eagerly) cannot turn the stand-in's refusal into a silent pass."""


def refuse_in_capture(fake, what: str) -> None:
    """Raise CaptureViolation when ``fake``'s stream is capturing."""
    if fake.capturing is not None:
        raise CaptureViolation(f"{what} during stream capture: the stand-in records only kernel launches "
                               f"and nvmath GEMMs; this would run now on the host and be missing from "
                               f"the graph's replay")


class DevicePointer:
    """What ``cupy.ndarray.data`` is for the code that reads it: ``.ptr``, the address of the
    array's first element (for the stand-in, a host address)."""

    def __init__(self, ptr: int):
        self.ptr = ptr


def device_array_class(fake):
    """An ndarray subclass standing in for cupy.ndarray.

    Always: ``.data.ptr`` is the first element's address (as cupy's MemoryPointer), and inside
    a capture every op other than a view raises CaptureViolation (real CUDA would record it;
    a NumPy array would run it at once and drop it from the replay).
    With ``fake.counts`` (counting): its host reads are syncs and its ops are counted, and it
    poses as cupy's (``__module__``) for ``xlstm.backends.backend_of``. As cupy's: a reduction or
    a scalar index gives a 0-d device array, not a host scalar, so ``float(a.sum())`` is a read
    of the device (counted) here as there.
    """
    counts = fake.counts

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

    def op(kind):
        refuse_in_capture(fake, kind)
        if counts is not None:
            counts.op(kind)

    def sync(kind):
        refuse_in_capture(fake, kind)
        if counts is not None:
            counts.sync(kind)

    def inside(kind, fn, /, *a, **k):
        """fn(*a, **k) counted as one op ``kind`` (None: a view, no op); what it calls is not counted."""
        if kind:
            op(kind)
        if counts is None:
            return fn(*a, **k)
        counts.depth += 1
        try:
            return fn(*a, **k)
        finally:
            counts.depth -= 1

    class Dev(np.ndarray):
        @property
        def data(self):
            return DevicePointer(self.ctypes.data)

        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            if "out" in kwargs:
                kwargs["out"] = tuple(plain(o) for o in kwargs["out"])
            return dev(inside("gemm" if ufunc is np.matmul else "ufunc", getattr(ufunc, method),
                              *(plain(i) for i in inputs), **kwargs))

        def __array_function__(self, func, types_, args, kwargs):
            name = func.__name__
            if not name.startswith("empty"):
                op(f"fn:{name}")
            elif fake.capturing is not None:
                refuse_in_capture(fake, f"fn:{name} (an allocation)")
            impl = func._implementation if hasattr(func, "_implementation") else \
                (lambda *a, **k: super(Dev, self).__array_function__(func, types_, a, k))
            return dev(inside(None, impl, *args, **kwargs))

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

        def fill(self, value):
            inside("setitem", super().fill, value)

        # what reads the device from the host (cupy synchronises for each)
        def get(self, *a, **k):
            sync("get")
            return np.array(self.view(np.ndarray))

        def item(self, *a):
            sync("item")
            return self.view(np.ndarray).item(*a)

        def tolist(self):
            sync("tolist")
            return self.view(np.ndarray).tolist()

        def __float__(self):
            sync("float")
            return float(self.view(np.ndarray))

        def __int__(self):
            sync("int")
            return int(self.view(np.ndarray))

        def __bool__(self):
            sync("bool")
            return bool(self.view(np.ndarray))

        def __index__(self):
            sync("index")
            return self.view(np.ndarray).__index__()

    if counts is not None:
        # seen as cupy's by xlstm.backends.backend_of and xlstm.checks (the stand-in must then be
        # the cupy backend: install_fakes(counting=True) arranges that)
        Dev.__module__ = "cupy"
    return Dev


def make_fake_cupy(lib, counting: bool = False):
    """A stand-in for the ``cupy`` module: NumPy arrays, host kernels, a NumPy gemm, streams
    whose capture records the kernel launches and nvmath GEMMs with the addresses they got.

    counting: the arrays are ``device_array_class`` instances and ``fake.counts`` (a
    DeviceCounts) records every host sync and device op of the code that uses them."""
    fake = types.SimpleNamespace()
    fake.counts = DeviceCounts() if counting else None
    fake.lib, fake.launches, fake.modules, fake.gemms = lib, [], [], []
    fake.streams, fake.capturing, fake.captured, fake.launched = {}, None, [], []
    Dev = fake.array_class = device_array_class(fake)

    def submit(op, stream, name):
        if fake.capturing is not None and stream is not fake.capturing:
            raise CaptureViolation(f"{name} issued on stream {stream.ptr} while stream "
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
            if isinstance(f, type) or not callable(f):
                return f                      # dtypes, scalar types, constants
            if name in _ALLOCATORS:
                def alloc(*a, **k):
                    refuse_in_capture(fake, f"cupy.{name} (an allocation)")
                    r = f(*a, **k)
                    return r.view(Dev) if isinstance(r, np.ndarray) else r
                return alloc
            if name == "asarray":
                def asarray(a, dtype=None):
                    refuse_in_capture(fake, "cupy.asarray")
                    if not isinstance(a, Dev) and fake.counts is not None:
                        fake.counts.uploads += 1     # a host array (or list) moved to the device
                    return np.asarray(a, dtype=dtype).view(Dev)
                return asarray

            def call(*a, **k):
                refuse_in_capture(fake, f"cupy.{name}")
                return f(*a, **k)
            return call

    mod = FakeCupy("cupy")
    mod.__version__ = "14.2.0"                # the first CuPy the persistent kernels accept
    mod.ndarray = np.ndarray
    def asnumpy(a):                           # a host copy, as cupy.asnumpy from a device
        refuse_in_capture(fake, "cupy.asnumpy")
        if isinstance(a, Dev) and fake.counts is not None:
            fake.counts.sync("asnumpy")
        return np.array(a.view(np.ndarray) if isinstance(a, np.ndarray) else a)

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

    class _Pool:                              # cupy's memory pool, as the bench reads it: nothing in use
        def used_bytes(self):
            return 0

        def malloc(self, nbytes):
            return None

    mod.get_default_memory_pool = _Pool
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
            if fake.capturing is not None and st["workspace"] is None:
                raise CaptureViolation("cuBLAS without a user workspace (reset by set_stream) would "
                                       "allocate during capture")
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
        if fake.capturing is not None and st["workspace"] is None:
            raise CaptureViolation("cuBLAS without a user workspace (reset by set_stream) would "
                                   "allocate during capture")
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


def install_fakes(host_lib, monkeypatch, nvmath: bool, counting: bool = False):
    """Puts the stand-in cupy (and, with ``nvmath``, the stand-in nvmath cuBLAS binding; else
    none, so the backend uses cupy's cuBLAS and the eager loop) in sys.modules; returns the
    stand-in's records (with ``counting``: ``fake.counts``, see DeviceCounts)."""
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
    return fake


