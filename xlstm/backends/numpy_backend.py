"""NumPy backend: the ops on the CPU, in place.

Plumbing only: the array module, scratch buffers reused across time steps (``scratch``), and
BLAS threads for small GEMMs (``gemm_threads``). The computations are the NumPy
implementations of ``xlstm/ops`` (installed as this class's methods): in-place ufuncs
(``out=``) so that a time loop allocates nothing but a few reused [B,H] scratch arrays, checked
against the readable references (``xlstm/cell.py``, ``xlstm/layernorm.py``) per dtype.
"""
from __future__ import annotations

import numpy as np

from .. import ops
from . import blas
from .base import Backend, is_device_array
from .scratch import Scratch


class NumpyBackend(Backend):
    name = "numpy"
    xp = np
    gemm_threads = staticmethod(blas.one_thread_below)   # one BLAS thread for a small GEMM

    def __init__(self):
        self.scratch = Scratch(np)
        # tmp(key, shape, dtype): a scratch buffer reused across time steps (so a loop does not
        # allocate); bound to the cache's lookup itself, one call fewer per use in the step ops
        self.tmp = self.scratch.get

    def asarray(self, a, dtype=None):
        if is_device_array(a):
            a = a.get()
        return np.asarray(a, dtype=dtype)

    def to_numpy(self, a, copy: bool = False):
        return np.array(self.asarray(a)) if copy else self.asarray(a)

    def deferred(self):
        from .deferred import HostReads
        return HostReads(self)


ops.install(NumpyBackend, "numpy")
