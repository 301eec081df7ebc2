"""The interface every backend implements, so the math code never branches on the device.

A backend is plumbing: an array module ``xp`` (numpy or cupy), moving arrays in and out,
synchronising, scratch buffers, and for CuPy compiling and launching kernels and capturing CUDA
graphs. The computations are the ops of ``xlstm/ops`` (one module per op: its spec, reference,
NumPy implementation and CuPy launch); each backend class installs its device's implementations
as methods (``xlstm.ops.install``), so ``be.lstm_forward_step(...)`` is the op's function.

This base class holds every backend's reference of the sequence ops (a layer-direction's whole
time loop, ``lstm_forward_sequence`` and friends): the per-step loop of
``xlstm.ops.lstm_sequence``, one recurrent GEMM and one fused step per time step. A backend may
install a faster loop with the same result (NumPy's vectorised BPTT, CuPy's graphs).
"""
from __future__ import annotations

import contextlib

from .. import ops


def is_device_array(a) -> bool:
    """True when ``a`` is an array of the CuPy backend (a GPU array), by its type's module."""
    return type(a).__module__.startswith("cupy")


class Backend:
    """Base class; subclasses set ``name`` and ``xp`` and install their device's ops."""

    name: str = "?"
    xp = None
    op_names: frozenset = frozenset()   # the ops this backend implements (set by ``ops.install``)
    force_eager = False            # True inside ``eager()``
    pending = None                 # the active ``deferred()`` queue: input checks of device arrays wait there

    @contextlib.contextmanager
    def eager(self):
        """Inside the block the sequence ops run their plain per-step loop: no captured or
        replayed CUDA graph, whatever the backend's switches say (traces use this)."""
        prev, self.force_eager = self.force_eager, True
        try:
            yield self
        finally:
            self.force_eager = prev

    def implements(self, op: str) -> bool:
        """True when this backend has its own implementation of ``op`` (``xlstm.ops.SPECS``)."""
        return op in self.op_names

    # -- arrays ---------------------------------------------------------------------------
    def asarray(self, a, dtype=None):
        """``a`` as an array of this backend (copies across devices only when needed)."""
        raise NotImplementedError

    def to_numpy(self, a, copy: bool = False):
        """``a`` as a NumPy array on the host.

        On the NumPy backend this is ``a`` itself (no copy) unless ``copy=True``: a caller that
        keeps the result while the backend goes on writing into ``a`` (gradients accumulate in
        place, buffers are reused) must ask for ``copy=True``. From a device it is always a copy.
        """
        raise NotImplementedError

    def deferred(self):
        """A queue of device values and input checks read in one transfer (``backends/deferred.py``)."""
        from .deferred import DeviceReads
        return DeviceReads(self)

    def synchronize(self) -> None:
        """Wait until all queued device work has finished (no-op on the CPU)."""

    def __repr__(self) -> str:
        return f"<xlstm backend {self.name!r}>"


for _name, _loop in ops.REFERENCE.items():
    setattr(Backend, _name, _loop)
del _name, _loop
