"""The stand-ins of the GPU tests against the REAL installed cupy and nvmath-python (no GPU).

tests/support/standin.py lets the CuPy backend's tests run against a
stand-in ``cupy`` and a stand-in ``nvmath.bindings.cublas`` written by this project; they can
only prove what their authors believed the APIs to be. These checks tie every call the backend
makes to the installed libraries instead: names, keyword-only parameters, parameter order,
enum values and the device-attribute keys. Both libraries import without a driver, and their
Cython functions carry their C signatures in the first docstring line, so all of this is
readable on a CPU-only machine. Each test skips, with the reason, where a library is missing.
What they cannot show (the driver's behaviour, cuBLAS results) is left to the ``gpu`` tests.
"""
from __future__ import annotations

import inspect
import re

import pytest


def _cupy():
    try:
        import cupy
        import cupy.cublas  # noqa: F401  (loaded lazily by cupy)
        from cupy.cuda import driver, function, graph  # noqa: F401
    except Exception as e:       # not installed, or a broken install
        pytest.skip(f"cupy is not importable here ({type(e).__name__}: {e})")
    return cupy


def _nvmath_cublas():
    try:
        from nvmath.bindings import cublas
    except Exception as e:
        pytest.skip(f"nvmath-python is not importable here ({type(e).__name__}: {e})")
    return cublas


def params(f) -> list[str]:
    """Parameter names of ``f`` (self dropped): from inspect, else from the signature Cython
    embeds in the first docstring line, e.g. ``launch(self, stream=None)`` or
    ``occupancyMaxActiveBlocksPerMultiprocessor(intptr_t func, int blockSize, ...) -> int``."""
    try:
        names = list(inspect.signature(f).parameters)
    except (TypeError, ValueError):
        line = (f.__doc__ or "").strip().splitlines()[0]
        m = re.match(r"^[\w.]+\((.*)\)", line)
        assert m, f"no signature in the docstring of {f!r}: {line!r}"
        names = []
        for p in m.group(1).split(","):
            p = p.split("=")[0].strip().replace("\\", "")
            if p and p != "*":
                names.append(p.split()[-1].lstrip("*"))
    return [n for n in names if n != "self"]


# -- cupy: stream capture and graphs (xlstm/backends/cuda_graphs.py) -----------------------------
def test_stream_capture_api_and_the_stand_in():
    cupy = _cupy()
    from cupy.cuda import graph, runtime
    from support.standin import _FakeGraph, _FakeStream

    S = cupy.cuda.Stream
    assert params(S) == ["null", "non_blocking", "ptds", "priority"]   # Stream(non_blocking=True)
    assert params(S.begin_capture) == params(_FakeStream.begin_capture) == ["mode"]
    assert params(S.end_capture) == params(_FakeStream.end_capture) == []
    assert params(S.is_capturing) == []
    # end_capture returns a cupy.cuda.graph.Graph (instantiated), launchable on any stream
    assert "cupy.cuda.Graph" in S.end_capture.__doc__
    assert "can be launched on any stream" in S.begin_capture.__doc__
    assert params(graph.Graph.launch) == params(_FakeGraph.launch) == ["stream"]
    # the default capture mode is relaxed: allocating from the pool during capture is not an
    # error in cupy (the stand-in refuses it as the project's own rule, see _ALLOCATORS)
    assert "streamCaptureModeRelaxed" in S.begin_capture.__doc__
    assert runtime.streamCaptureModeRelaxed == 2
    assert params(cupy.cuda.get_current_stream) == ["device_id"]


# -- cupy: kernels (xlstm/backends/cupy_backend.py) -----------------------------------------------
def test_stream_interop_for_xlstm_torch():
    """backends/dlpack.on_stream wraps torch's current stream with cupy's Stream.from_external
    (cupy >= 14; ExternalStream, its fallback, is deprecated there), from the stream object's
    ``__cuda_stream__``, which torch's CUDA streams provide."""
    cupy = _cupy()
    assert params(cupy.cuda.Stream.from_external) in (["obj"], ["cls", "obj"])
    assert params(cupy.from_dlpack)[0] == "array"
    torch = pytest.importorskip("torch", reason="torch is not installed")
    assert hasattr(torch.cuda.Stream, "__cuda_stream__")


def test_raw_module_keywords_and_the_stand_in(tmp_path):
    cupy = _cupy()
    from support.standin import make_fake_cupy

    src = 'extern "C" __global__ void k(float* x) { x[0] = 1.0f; }'
    # constructing compiles nothing, so this runs without a device
    m = cupy.RawModule(code=src, options=("-std=c++17",), enable_cooperative_groups=True)
    assert m.enable_cooperative_groups is True
    with pytest.raises(TypeError):
        cupy.RawModule(src)                                   # code is keyword-only
    with pytest.raises(TypeError):
        cupy.RawModule(code=src, options=["-std=c++17"])      # options must be a tuple
    fake = make_fake_cupy(lib=None).module
    with pytest.raises(TypeError):
        fake.RawModule(src)
    with pytest.raises(TypeError):
        fake.RawModule(code=src, options=["-std=c++17"])


def test_raw_kernel_launch_and_attributes():
    cupy = _cupy()
    from cupy.cuda import driver, function

    assert params(cupy.RawKernel.__call__) == ["grid", "block", "args", "kwargs"]
    assert "shared_mem=0" in cupy.RawKernel.__call__.__doc__
    assert hasattr(cupy.RawKernel, "kernel")                  # a Function, compiled on first use
    assert hasattr(function.Function, "ptr")                  # the CUfunction handle
    k = cupy.RawKernel('extern "C" __global__ void k() {}', "k")
    # max_dynamic_shared_size_bytes is settable: setting it goes to the driver (which is
    # missing here), while a read-only attribute refuses in Python
    with pytest.raises(AttributeError):
        k.num_regs = 1
    try:
        k.max_dynamic_shared_size_bytes = 64 * 1024
    except AttributeError as e:
        pytest.fail(f"max_dynamic_shared_size_bytes is not settable: {e}")
    except Exception:
        pass                                                   # no driver: the expected failure
    # the occupancy query the backend calls with (k.kernel.ptr, threads, dynamic smem bytes)
    assert params(driver.occupancyMaxActiveBlocksPerMultiprocessor) == ["func", "blockSize", "dynamicSMemSize"]


def test_device_attribute_keys():
    """``Device(i).attributes`` keys are the runtime's cudaDevAttr* names without the prefix."""
    _cupy()
    from cupy_backends.cuda.api import runtime

    from support.standin import make_fake_cupy

    fake_keys = set(make_fake_cupy(lib=None).module.cuda.Device(0).attributes)
    assert fake_keys == {"MultiProcessorCount", "MaxSharedMemoryPerBlockOptin",
                         "MaxSharedMemoryPerMultiprocessor"}
    for key in fake_keys:
        assert hasattr(runtime, "cudaDevAttr" + key), key
    assert params(runtime.getDeviceProperties) == ["device"]   # its "name" is bytes (decoded)


def test_cupy_gemm_fallback_signature():
    cupy = _cupy()
    from support.standin import make_fake_cupy

    real = params(cupy.cublas.gemm)
    assert real == ["transa", "transb", "a", "b", "out", "alpha", "beta"]
    assert params(make_fake_cupy(lib=None).module.cublas.gemm) == real


def test_scatter_add_rows_calls_exist():
    """The cupy calls of xlstm.layers.scatter_add_rows, with the keywords it passes."""
    cupy = _cupy()
    assert "kind" in params(cupy.argsort)
    cupy.ndarray._check_kind_sort("stable")                   # accepted: thrust's stable sort
    with pytest.raises(ValueError):
        cupy.ndarray._check_kind_sort("quicksort")
    assert params(cupy.full)[:3] == ["shape", "fill_value", "dtype"]
    assert params(cupy.ones)[:2] == ["shape", "dtype"]
    assert params(cupy.where) == ["condition", "x", "y"]
    assert params(cupy.concatenate)[:1] == ["tup"] and params(cupy.nonzero) == ["a"]
    assert hasattr(cupy.add, "at")                            # benchmarks/embedding_grad.py


def test_bench_pool_calls_exist():
    cupy = _cupy()
    pool = cupy.get_default_memory_pool()
    assert callable(pool.used_bytes) and callable(pool.malloc)
    assert params(cupy.cuda.set_allocator) == ["allocator"]
    assert callable(cupy.cuda.runtime.runtimeGetVersion)


# -- nvmath-python's cuBLAS binding (xlstm/backends/cublas_gemm.py) --------------------------------
GEMM = ["handle", "transa", "transb", "m", "n", "k", "alpha", "a", "lda", "b", "ldb", "beta", "c", "ldc"]


def test_nvmath_cublas_calls_match_the_stand_in():
    cublas = _nvmath_cublas()
    from support.standin import make_fake_cupy, make_fake_nvmath

    fake = make_fake_nvmath(make_fake_cupy(lib=None))["nvmath.bindings.cublas"]
    want = {"create": [], "destroy": ["handle"], "set_stream": ["handle", "stream_id"],
            "set_workspace": ["handle", "workspace", "workspace_size_in_bytes"],
            "set_pointer_mode": ["handle", "mode"], "sgemm": GEMM, "dgemm": GEMM}
    for name, names in want.items():
        assert params(getattr(cublas, name)) == names, name
        assert params(getattr(fake, name)) == names, f"stand-in {name}"
    # alpha/beta/a/b/c are intptr_t: host addresses for alpha and beta in PointerMode.HOST
    assert "intptr_t alpha" in cublas.sgemm.__doc__ and "intptr_t c" in cublas.sgemm.__doc__
    assert int(cublas.PointerMode.HOST) == int(fake.PointerMode.HOST) == 0
    assert int(cublas.Operation.N) == int(fake.Operation.N) == 0
    assert int(cublas.Operation.T) == int(fake.Operation.T) == 1


def test_nvmath_mixed_precision_names():
    """The names a cublasGemmEx caller needs (BF16 inputs, TF32 compute), as nvmath 1.x
    spells them: the data types live in ``nvmath.CudaDataType``, not in the cublas module."""
    cublas = _nvmath_cublas()
    import nvmath

    assert params(cublas.gemm_ex) == ["handle", "transa", "transb", "m", "n", "k", "alpha", "a", "atype",
                                      "lda", "b", "btype", "ldb", "beta", "c", "ctype", "ldc",
                                      "compute_type", "algo"]
    dt = nvmath.CudaDataType
    assert (int(dt.CUDA_R_32F), int(dt.CUDA_R_64F), int(dt.CUDA_R_16F), int(dt.CUDA_R_16BF)) == (0, 1, 2, 14)
    ct = cublas.ComputeType
    assert (int(ct.COMPUTE_32F), int(ct.COMPUTE_64F), int(ct.COMPUTE_32F_FAST_TF32),
            int(ct.COMPUTE_32F_FAST_16BF)) == (68, 70, 77, 75)
    assert int(cublas.GemmAlgo.DFALT) == -1
    assert int(cublas.Math.TF32_TENSOR_OP_MATH) == 3

