"""Scratch buffers reused across time steps and calls, so hot loops do not allocate.

One cache per owner (a backend, an optimiser): ``get(name, shape, dtype)`` returns the same
uninitialised array for the same key every time; ``init`` fills a new one once (constants).
When more than ``limit`` keys were made (many shapes seen) the cache starts over, keeping
memory bounded; an array handed out earlier stays valid for whoever still holds it.
"""
from __future__ import annotations

import numpy as np


class Scratch:
    """Arrays of ``xp`` keyed by (name, shape, dtype[, device()])."""

    def __init__(self, xp, device=None, limit: int = 64):
        self.xp = xp
        self._device = device          # a function giving the current device id, or None (CPU)
        self._limit = limit
        self._bufs: dict = {}

    def get(self, name, shape, dtype, init=None):
        """The scratch array ``name`` of this shape and dtype (made once; ``init(xp, shape, dtype)``
        makes it instead of ``xp.empty`` when given). On the CPU ``dtype`` goes into the key as
        given: normalising it (``np.dtype(d).str``) costs more than the lookup, per step."""
        if self._device is None:
            k = (name, shape, dtype)
        else:                          # a device cache: every spelling of a dtype is one key
            k = (name, shape, np.dtype(dtype).str, self._device())
        buf = self._bufs.get(k)
        if buf is None:
            if len(self._bufs) > self._limit:
                self._bufs.clear()
            buf = self._bufs[k] = self.xp.empty(shape, dtype) if init is None else init(self.xp, shape, dtype)
        return buf

    def __len__(self) -> int:
        return len(self._bufs)

    def clear(self) -> None:
        self._bufs.clear()
