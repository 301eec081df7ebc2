"""What a benchmark ran on, and what else ran meanwhile: machine description, other processes'
CPU load, peak memory (host RSS, NumPy allocations, CuPy's pool), and CuPy's first call (capture)."""
from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time
import tracemalloc

import numpy as np


def _try_import_torch():
    try:
        import torch  # noqa: F401
        return torch
    except Exception:  # not installed or broken: the torch columns stay empty
        return None


def _blas_info() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: v for k, v in d.items() if k in ("internal_api", "version", "architecture",
                                                  "num_threads", "threading_layer", "prefix")}
            for d in threadpool_info()]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                           text=True, timeout=10)
        return r.stdout.strip() or None
    except Exception:
        return None


def machine_info(torch=None, backends=()) -> dict:
    """What the numbers were measured on: CPU, cores, BLAS (threadpoolctl), versions."""
    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "numpy": np.__version__,
        "blas": _blas_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                if os.environ.get(k) is not None},
        "torch": None if torch is None else torch.__version__,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    for be in backends:
        if be.name == "cupy":
            try:
                cp = be.xp
                props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
                name = props["name"]
                info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
                info["cupy"] = cp.__version__
                info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
            except Exception as e:  # informative only
                info["gpu"] = f"unknown ({e})"
            if torch is not None and torch.cuda.is_available():
                info["cudnn"] = torch.backends.cudnn.version()
                info["torch_tf32"] = "off (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)"
    return info



class ForeignLoad:
    """CPU time spent by everything but this process during a span, in cores (Linux /proc/stat).

    On a shared machine other work steals cores; the number is kept with every cell so that a
    noisy cell can be told from a slow one."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)
            return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system

    def cores(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        return max((busy - self.busy0) - (self._own() - self.own0), 0.0) / max(wall, 1e-9)


# -- peak memory ------------------------------------------------------------------------------
def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def host_peak_rss_mb(fn) -> float | None:
    """The process's peak RSS during ``fn()`` in MiB (Linux: VmHWM, reset to the current RSS first).

    This is the whole process (interpreter, libraries, the other contenders' models), so compare
    it between contenders of one cell; ``numpy_alloc_peak_mb`` is the step's own share."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    fn()
    peak = _proc_status_kb("VmHWM")
    return None if peak is None else peak / 1024.0


def numpy_alloc_peak_mb(fn) -> float:
    """Peak of the memory NumPy allocated during ``fn()`` (tracemalloc sees NumPy's buffers)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return max(peak - base, 0) / 2 ** 20


def cupy_pool_peak_mb(backend, fn) -> float:
    """Peak bytes in use in CuPy's default memory pool during ``fn()``, above the level before."""
    xp = backend.xp
    pool = xp.get_default_memory_pool()
    backend.synchronize()
    base = pool.used_bytes()
    peak = [base]

    def malloc(nbytes):
        mem = pool.malloc(nbytes)
        used = pool.used_bytes()
        if used > peak[0]:
            peak[0] = used
        return mem

    xp.cuda.set_allocator(malloc)
    try:
        fn()
        backend.synchronize()
    finally:
        xp.cuda.set_allocator(pool.malloc)
    return (peak[0] - base) / 2 ** 20


def cupy_first_call(backend, fn) -> dict:
    """The first call of a cell on CuPy (where CUDA graphs are captured) against what it left:
    first_step_ms (host wall time, synchronised), graph_capture_s (host time capturing),
    graph_mb (buffers the new graphs own), pool_growth_mb (CuPy pool bytes in use after - before)."""
    pool = backend.xp.get_default_memory_pool()
    graphs = getattr(backend, "graphs", None)
    active = bool(getattr(backend, "graphs_active", lambda: False)())
    before = graphs.stats() if graphs is not None else None
    backend.synchronize()
    used = pool.used_bytes()
    t0 = time.perf_counter()
    fn()
    out = dict(cuda_graphs="on" if active else "off", first_step_ms=(time.perf_counter() - t0) * 1e3,
               pool_growth_mb=(pool.used_bytes() - used) / 2 ** 20)
    if graphs is not None:
        after = graphs.stats()
        out.update(graph_capture_s=after["capture_seconds"] - before["capture_seconds"],
                   graph_mb=(after["bytes"] - before["bytes"]) / 2 ** 20)
    return out
