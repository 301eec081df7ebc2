"""NumPy's BLAS thread count: the one place that reads or sets it.

    set_threads(n)          the process's BLAS threads (``xlstm train --threads``, ``xlstm bench --threads``)
    limit_threads(n)        the same, undone by the returned object's ``restore()``
    one_thread_below(macs)  a context: one thread for a GEMM of at most SMALL_GEMM_MACS multiply-adds

threadpoolctl is used where installed; otherwise the ``openblas_set_num_threads`` symbol of the
OpenBLAS that NumPy's wheels bundle (``numpy.libs``) or that the process has loaded, through
ctypes. Any failure leaves the threads as they are.
"""
from __future__ import annotations

import contextlib

import numpy as np

# Below this many multiply-adds a GEMM runs on one BLAS thread. Measured on a 2-core AMD EPYC
# with NumPy's OpenBLAS 0.3.31: the per-step [32,H]x[H,4H] product takes the same time on one
# thread as on two for H <= 128 (10 us at H=64, 50 us at H=128), while handing it to a second
# thread costs a wake-up each call and, when another process holds a core, up to 20x more.
SMALL_GEMM_MACS = 1 << 22

_NOT_LOOKED = object()
_openblas = _NOT_LOOKED


def _find_openblas():
    """(get, set) of the thread count of NumPy's own OpenBLAS via ctypes, or None if not found.

    Looks in the wheel's ``numpy.libs`` (scipy-openblas, symbols ``scipy_openblas_*64_``) and
    in the process (a system OpenBLAS).
    """
    import ctypes
    import glob
    import os

    cands = []
    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    cands += sorted(glob.glob(os.path.join(libdir, "*openblas*")))
    cands.append(None)                                   # symbols already loaded in the process
    for path in cands:
        try:
            lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        except OSError:
            continue
        for pre, suf in (("scipy_", "64_"), ("", "64_"), ("", "")):
            get = getattr(lib, f"{pre}openblas_get_num_threads{suf}", None)
            set_ = getattr(lib, f"{pre}openblas_set_num_threads{suf}", None)
            if get is not None and set_ is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
                try:
                    if get() >= 1:
                        return get, set_
                except Exception:
                    pass
    return None


def openblas_threads():
    """(get, set) functions of NumPy's OpenBLAS thread count, or None (looked up once)."""
    global _openblas
    if _openblas is _NOT_LOOKED:
        try:
            _openblas = _find_openblas()
        except Exception:
            _openblas = None
    return _openblas


class _Limit:
    """What ``limit_threads`` changed; ``restore()`` puts it back."""

    def __init__(self, undo=None):
        self._undo = undo

    def restore(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


def limit_threads(n: int) -> _Limit | None:
    """Set the process's BLAS threads to ``n``; an object whose ``restore()`` undoes it, or None
    when no BLAS control was found."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        ctl = openblas_threads()
        if ctl is None:
            return None
        before = ctl[0]()
        ctl[1](int(n))
        return _Limit(lambda: ctl[1](before))
    lim = threadpool_limits(limits=int(n), user_api="blas")
    return _Limit(lim.restore_original_limits)


def set_threads(n: int) -> bool:
    """Set the process's BLAS thread count; True when it worked."""
    return limit_threads(n) is not None


@contextlib.contextmanager
def one_thread_below(macs: int):
    """One BLAS thread inside the block when a GEMM of ``macs`` multiply-adds is small (see
    SMALL_GEMM_MACS); otherwise BLAS's threads are left as they are."""
    threads = openblas_threads() if macs <= SMALL_GEMM_MACS else None
    n = threads[0]() if threads is not None else 1
    if n <= 1:
        yield
        return
    threads[1](1)
    try:
        yield
    finally:
        threads[1](n)
