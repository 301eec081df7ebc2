"""Build and bind the host version of the CUDA kernels (``tests/support/kernels_host_shim.cpp``).

Used by ``test_kernels_host.py`` (the math against NumPy) and ``support/standin.py`` (the
CuPy backend's launches run on the host). Every kernel ``K`` of the sources in
``xlstm.kernels.SOURCES`` has a host twin ``host_K`` with the same parameter list (the persistent
kernels' twins take three more: the launch's grid, block and shared-memory bytes, see
``LAUNCH_PARAMS``); ``build`` reads the parameter lists from the .cu sources themselves, so a
kernel signature change shows up here without edits.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from xlstm.kernels import KERNELS_DIR, SOURCES, kernel_source

SHIM = Path(__file__).resolve().parent / "kernels_host_shim.cpp"

_CTYPES = {"float": ctypes.c_float, "double": ctypes.c_double, "long long": ctypes.c_longlong,
           "unsigned short": ctypes.c_uint16, "unsigned int": ctypes.c_uint}
_NUMPY = {"float": np.float32, "double": np.float64, "long long": np.int64, "unsigned short": np.uint16,
          "unsigned int": np.uint32}

# Kernels whose host twin runs a whole launch's schedule: after the kernel's own parameters it
# takes the launch's grid size, block size and dynamic shared-memory bytes (long long each).
LAUNCH_PARAMS = ("NB", "nt", "smem_bytes")


def takes_launch(name: str) -> bool:
    """True when host_<name> takes LAUNCH_PARAMS after the kernel's parameters."""
    return name.startswith("lstm_persistent_")


def compiler_missing_reason() -> str | None:
    if shutil.which("g++") or shutil.which("c++"):
        return None
    return ("no host C++ compiler (g++/c++) on PATH: cannot build the host shim of "
            "xlstm/kernels/lstm_pointwise.cuh")


def build(out_dir: Path) -> ctypes.CDLL:
    """Compiles the shim with g++ into out_dir and returns it loaded, every host_K bound."""
    cxx = shutil.which("g++") or shutil.which("c++")
    out = Path(out_dir) / "libxlstm_host_kernels.so"
    # -ffp-contract=off: no fused multiply-add on the host, so host results are the plain
    # IEEE evaluation of the header's expressions (the NumPy reference does no FMA either).
    cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra",
           "-Werror", f"-I{KERNELS_DIR}", str(SHIM), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise AssertionError(f"host build of the kernels failed:\n{' '.join(cmd)}\n{res.stderr}")
    return load(out)


def load(path) -> ctypes.CDLL:
    """The built host library at ``path`` (``lib._name``), every host_K bound to its C signature."""
    lib = ctypes.CDLL(str(path))
    for src in SOURCES:
        for name, params in kernel_signatures(kernel_source(src)).items():
            fn = getattr(lib, "host_" + name)
            fn.argtypes = [ctypes.c_void_p if ptr else _CTYPES[base] for ptr, base, _ in params]
            if takes_launch(name):
                fn.argtypes += [ctypes.c_longlong] * len(LAUNCH_PARAMS)
            fn.restype = None
    lib.host_persistent_smem_elems.argtypes = [ctypes.c_int] + [ctypes.c_longlong] * 4
    lib.host_persistent_smem_elems.restype = ctypes.c_longlong
    return lib


def build_or_skip(tmp_path_factory, name: str) -> ctypes.CDLL:
    """The host library built in a fresh temp folder, or a pytest skip naming the missing compiler."""
    import pytest

    why = compiler_missing_reason()
    if why:
        pytest.skip(why)
    return build(tmp_path_factory.mktemp(name))


def kernel_signatures(source: str | None = None) -> dict:
    """{kernel name: [(is_pointer, base type, parameter name), ...]} of every extern "C" kernel."""
    src = kernel_source() if source is None else source
    src = re.sub(r"//[^\n]*", "", src)
    out = {}
    for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?'
                         r'(\w+)\s*\(([^)]*)\)', src):
        params = []
        for p in m.group(2).split(","):
            p = " ".join(p.replace("*", " * ").split())
            ptr = "*" in p
            words = [w for w in p.replace("*", " ").split() if w not in ("const", "__restrict__")]
            base, pname = " ".join(words[:-1]), words[-1]
            assert base in _CTYPES, f"kernel {m.group(1)}: unsupported parameter type {p!r}"
            params.append((ptr, base, pname))
        out[m.group(1)] = params
    return out


def numpy_type(base: str):
    """The NumPy scalar type a launch must pass for a scalar parameter of C type ``base``."""
    return _NUMPY[base]


# -- comparing host-kernel results (float64 to 1e-12, float32 to 1e-6, normwise) --
TOL = {np.float32: 1e-6, np.float64: 1e-12}
SUFFIX = {np.float32: "f32", np.float64: "f64"}


def ptr(a):
    """Data pointer of a C-contiguous array, or None (NULL) for an unused input."""
    if a is None:
        return None
    assert a.flags.c_contiguous
    return a.ctypes.data


def err(a, b):
    """Normwise error max|a-b| / max(max|b|, 1)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite value in the kernel's output"
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0))


def check(what, dt, got, want):
    e = err(got, want)
    assert e <= TOL[dt], f"{what} ({np.dtype(dt).name}): error {e:.3g} > {TOL[dt]:g}"
