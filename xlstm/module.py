"""Module: what every layer with parameters shares (params/grads dicts, backend moves, modes).

A module keeps ``params`` and ``grads``: dicts name -> array with the same keys and shapes,
living on the module's backend. ``backward`` accumulates into ``grads``; optimisers update
``params`` in place; ``zero_grad`` clears the gradients.
"""
from __future__ import annotations

import numpy as np

from . import backends
from .errors import InputError
from .precision import check_precision

DTYPES = ("float32", "float64")


def check_dtype(dtype) -> np.dtype:
    """The NumPy dtype for 'float32'/'float64' (or np.float32/np.float64); else InputError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dt


class Module:
    """Base class of LSTM, Dense, Embedding, Sequential."""

    def __init__(self, dtype="float32", backend=None, precision="float32"):
        self.dtype = check_dtype(dtype)
        self.precision = precision
        self.backend = backends.resolve(backend)
        self.params: dict = {}
        self.grads: dict = {}
        self.training = True

    @property
    def precision(self) -> str:
        """GEMM precision: 'float32' (exact), 'tf32' or 'bf16' (rounded operands, float32
        accumulation; float32 models only). See ``xlstm/precision.py``. Settable."""
        return self._precision

    @precision.setter
    def precision(self, value) -> None:
        self._precision = check_precision(value, self.dtype)

    @property
    def xp(self):
        return self.backend.xp

    def _add_param(self, name: str, value) -> None:
        """Register a parameter (given as a NumPy array) and its zero gradient."""
        value = np.asarray(value, dtype=self.dtype)
        self.params[name] = self.backend.asarray(value)
        self.grads[name] = self.xp.zeros_like(self.params[name])

    def zero_grad(self) -> None:
        for g in self.grads.values():
            g[...] = 0

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, backend):
        """Move parameters and gradients to ``backend`` ('numpy', 'cupy' or a Backend); returns self."""
        b = backends.resolve(backend)
        for d in (self.params, self.grads):
            for k in d:
                d[k] = b.asarray(self.backend.to_numpy(d[k]))
        self.backend = b
        return self

    def state_dict(self) -> dict:
        """Parameters as NumPy arrays (copies), by name."""
        return {k: self.backend.to_numpy(v, copy=True) for k, v in self.params.items()}

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays (NumPy or this backend's) into the parameters; names and shapes must match."""
        missing = set(self.params) - set(state)
        extra = set(state) - set(self.params)
        if missing or extra:
            raise InputError(f"load_state_dict: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
        for k, v in state.items():
            v = np.asarray(self.backend.to_numpy(v) if not isinstance(v, np.ndarray) else v)
            if v.shape != self.params[k].shape:
                raise InputError(f"load_state_dict: {k!r} has shape {v.shape}, expected {self.params[k].shape}")
            self.params[k][...] = self.backend.asarray(v.astype(self.dtype))

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.params.values()))
