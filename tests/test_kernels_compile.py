"""Every CUDA kernel compiles to PTX for sm_80 and sm_90, for every dtype, without a GPU.

Two independent compilers, each skipped with the reason where it is missing (at least one
must run in CI; see ``test_at_least_one_compiler``):

* NVRTC through cupy's bindings (``cupy_backends.cuda.libs.nvrtc``), from the same inlined
  source that ``CupyBackend`` hands to ``cupy.RawModule`` at run time. Needs cupy and the
  NVRTC library (pip: ``cupy-cuda13x`` and ``nvidia-cuda-nvrtc``), no driver or device.
  NVRTC also links each source to a cubin with the options cupy 14 itself appends
  (``-ftz=true``, ``-arch=sm_XX``, ``--device-as-default-execution-space``).
* ``nvcc -ptx`` on the source files as they lie in the package (``-I`` to the kernel folder).

Every source of ``xlstm.kernels.SOURCES`` (the per-step kernels and the persistent ones) is
compiled on its own, as the backend loads each into its own module. Each PTX must contain a
``.entry`` for every kernel name of ``xlstm.ops.entry_names(source)``. Where nvcc exists,
ptxas also assembles every kernel to a cubin for sm_80 and sm_90 and its resource report is
checked (no register spills; registers fit the backend's largest block for that source).
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from xlstm.backends.persistent import MAX_THREADS
from xlstm.kernels import KERNELS_DIR, MAIN_SOURCE, PERSISTENT_SOURCE, SOURCES, kernel_path, kernel_source
from xlstm.ops import entry_names

ARCHS = ("80", "90")
# The options CupyBackend passes to RawModule (plus the architecture).
OPTIONS = ("-std=c++17",)
# The largest block the backend launches per source (the register check's thread count).
MAX_BLOCK = {MAIN_SOURCE: 256, PERSISTENT_SOURCE: MAX_THREADS}


def _nvrtc():
    """cupy's NVRTC module when it can compile here, else None and the reason."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as e:  # cupy missing, or its NVRTC library missing
        return None, f"cupy's NVRTC bindings are not importable ({type(e).__name__}: {e})"
    try:
        nvrtc.getVersion()
    except Exception as e:
        return None, (f"the NVRTC library is not loadable ({type(e).__name__}: {e}); "
                      "pip install nvidia-cuda-nvrtc (CUDA 13) beside cupy-cuda13x")
    return nvrtc, None


def _nvcc():
    """Path of a working nvcc, else None and the reason."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc is not on PATH"
    return nvcc, None


def nvrtc_build(nvrtc, source: str, options: tuple, get):
    """NVRTC on the inlined ``source`` with ``options``; ``get(prog)`` of the result (getPTX or
    getCUBIN). Fails on an error or a warning."""
    prog = nvrtc.createProgram(kernel_source(source), source, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            pytest.fail(f"NVRTC failed with {options}:\n{nvrtc.getProgramLog(prog)}")
        out, log = get(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
    assert "warning" not in (log or "").lower(), f"NVRTC warnings with {options}:\n{log}"
    return out


def compile_nvrtc(nvrtc, arch: str, source: str = MAIN_SOURCE) -> str:
    ptx = nvrtc_build(nvrtc, source, OPTIONS + (f"-arch=compute_{arch}",), nvrtc.getPTX)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    return ptx.rstrip("\x00")


def compile_nvcc(nvcc, arch: str, tmp_path, source: str = MAIN_SOURCE) -> str:
    out = tmp_path / f"{source}_sm{arch}.ptx"
    cmd = [nvcc, "-std=c++17", "-ptx", f"-arch=sm_{arch}", "-Werror", "all-warnings",
           f"-I{KERNELS_DIR}", str(kernel_path(source)), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{res.stderr}"
    return out.read_text()


def check_ptx(ptx: str, arch: str, compiler: str, source: str = MAIN_SOURCE) -> None:
    m = re.search(r"^\s*\.target\s+(\S+)", ptx, re.MULTILINE)
    assert m and m.group(1).startswith(f"sm_{arch}"), f"{compiler}: PTX .target is {m and m.group(1)}"
    entries = set(re.findall(r"\.entry\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", ptx))
    missing = [n for n in entry_names(source) if n not in entries]
    assert not missing, f"{compiler} sm_{arch}: no .entry for {missing} (found {sorted(entries)})"
    # -use_fast_math would turn tanh into tanh.approx (~1e-3 relative): the tests' 1e-5
    # float32 tolerance relies on the accurate libdevice tanh
    assert "tanh.approx" not in ptx, f"{compiler} sm_{arch}: approximate tanh in the PTX"


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_ptx(arch, source):
    nvrtc, why = _nvrtc()
    if nvrtc is None:
        pytest.skip(why)
    check_ptx(compile_nvrtc(nvrtc, arch, source), arch, "NVRTC", source)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_ptx(arch, source, tmp_path):
    nvcc, why = _nvcc()
    if nvcc is None:
        pytest.skip(why)
    check_ptx(compile_nvcc(nvcc, arch, tmp_path, source), arch, "nvcc", source)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_nvcc_cubin_resources(arch, source, tmp_path):
    """ptxas assembles every kernel for the real architecture, without spills, and each fits
    the backend's launches (MAX_BLOCK threads a block: MAX_BLOCK x regs within the 64K-register
    file of an SM)."""
    nvcc, why = _nvcc()
    if nvcc is None:
        pytest.skip(why)
    out = tmp_path / f"{source}_sm{arch}.cubin"
    cmd = [nvcc, "-std=c++17", "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v", f"-I{KERNELS_DIR}",
           str(kernel_path(source)), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc -cubin failed:\n{' '.join(cmd)}\n{res.stderr}"
    info = {}
    name = None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and name:
            info.setdefault(name, {})["spill"] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            info.setdefault(name, {})["regs"] = int(m.group(1))
    assert set(entry_names(source)) <= set(info), f"ptxas reported {sorted(info)}"
    nt = MAX_BLOCK[source]
    for k, v in info.items():
        assert v.get("spill", 0) == 0, f"{k} sm_{arch}: {v['spill']} bytes of register spills"
        assert v["regs"] * nt <= 65536, f"{k} sm_{arch}: {v['regs']} registers do not fit {nt} threads"


# What cupy 14 appends to RawModule's options when it compiles for a device: -ftz=true
# (cupy/cuda/compiler.py, _compile_with_cache_cuda), then the architecture as -arch=sm_XX, a
# cubin, where NVRTC knows the device's architecture (_get_arch_for_options_for_nvrtc), and
# --device-as-default-execution-space (_compile_using_nvrtc_no_warning).
CUPY_APPENDS = ("-ftz=true",)
CUPY_APPENDS_AFTER_ARCH = ("--device-as-default-execution-space",)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_cubin_with_cupys_options(arch, source):
    """The exact NVRTC call cupy makes on an sm_80 / sm_90 device links to a cubin, quietly."""
    nvrtc, why = _nvrtc()
    if nvrtc is None:
        pytest.skip(why)
    options = OPTIONS + CUPY_APPENDS + (f"-arch=sm_{arch}",) + CUPY_APPENDS_AFTER_ARCH
    cubin = nvrtc_build(nvrtc, source, options, nvrtc.getCUBIN)
    assert cubin[:4] == b"\x7fELF", "NVRTC gave no cubin"


def test_at_least_one_compiler():
    """CI must prove that the kernels compile: fail (not skip) when neither compiler exists."""
    nvrtc, why_nvrtc = _nvrtc()
    nvcc, why_nvcc = _nvcc()
    assert nvrtc is not None or nvcc is not None, (
        f"no CUDA compiler to check the kernels with: NVRTC: {why_nvrtc}; nvcc: {why_nvcc}. "
        "Install cupy-cuda13x and nvidia-cuda-nvrtc (pip) or the CUDA toolkit's nvcc.")


def test_inlined_source_is_self_contained():
    """The source RawModule gets has our header pasted in, so cupy's cache key covers it."""
    src = kernel_source()
    assert '#include "lstm_pointwise.cuh"' not in src
    assert "forward_element" in src and "lstm_backward_step_f64" in src
    for header in ("lstm_pointwise.cuh", "precision.cuh", "optim.cuh", "xent.cuh"):   # each pasted in once
        assert f'#include "{header}"' not in src
        assert src.count(f"// ---- begin {header} ----") == 1
    assert src.count("namespace xlstm {") == 4      # one per header: lstm_pointwise, precision, optim, xent
    psrc = kernel_source(PERSISTENT_SOURCE)
    assert '#include "lstm_persistent.cuh"' not in psrc and '#include "lstm_pointwise.cuh"' not in psrc
    assert "persistent_forward_partial" in psrc and "forward_element" in psrc
