"""Deferred reads: device values and input checks read in one transfer, at a point the caller picks.

    with backend.deferred() as reads:        # checks of device inputs queue here too
        reads.put(("loss", step), loss)      # a 0-d array of the backend
        ...
        values = reads.read()                # {key: float}; raises the first failed check

On the host (NumPy) a value is a float at once and a check is read at once: nothing waits.
On a device (CuPy) nothing is read until ``read()``, which stacks every queued value and
check flag and copies them to the host in one transfer, so the device runs ahead of Python
between reads. The training loop sees only this interface.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError


def _fail(message):
    raise InputError(message() if callable(message) else message)


class HostReads:
    """Reads at once: the values are already on the host."""

    def __init__(self, backend):
        self.backend, self._values, self._outer = backend, {}, None

    def put(self, key, value) -> None:
        self._values[key] = float(value)

    def check(self, ok, message) -> None:
        """Raise InputError(message) unless ``ok``; ``message`` may be a function giving it."""
        if not bool(ok):
            _fail(message)

    def drop(self) -> None:
        """Forget what was queued, unread (a caller that must never wait on the device)."""
        self._values = {}

    def read(self) -> dict:
        """Every value put since the last read, as floats, in the order put."""
        out, self._values = self._values, {}
        return out

    def __enter__(self):
        # input checks of the backend's arrays (xlstm.checks.require) come here while the block runs
        self._outer, self.backend.pending = getattr(self.backend, "pending", None), self
        return self

    def __exit__(self, exc_type, exc, tb):
        self.backend.pending = self._outer
        if exc_type is None:
            self.read()         # a check queued after the last read still raises


class DeviceReads(HostReads):
    """Queues 0-d device arrays and check flags; ``read()`` copies them in one transfer."""

    def __init__(self, backend):
        super().__init__(backend)
        self._checks = []

    def put(self, key, value) -> None:
        self._values[key] = value

    def check(self, ok, message) -> None:
        if isinstance(ok, (bool, np.bool_)):
            if not ok:
                _fail(message)
            return
        self._checks.append((ok, message))

    def drop(self) -> None:
        self._values, self._checks = {}, []

    def read(self) -> dict:
        checks, self._checks = self._checks, []
        keys, values = list(self._values), list(self._values.values())
        self._values = {}
        if not checks and not values:
            return {}
        xp = self.backend.xp
        flat = self.backend.to_numpy(xp.stack([xp.asarray(v, dtype=np.float64)
                                               for v in [f for f, _ in checks] + values]))
        for (_, message), good in zip(checks, flat):
            if not good:
                _fail(message)
        return {k: float(v) for k, v in zip(keys, flat[len(checks):])}
