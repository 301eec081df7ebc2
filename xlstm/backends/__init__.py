"""Backend registry: one flag moves every model between NumPy (CPU) and CuPy (CUDA).

    xlstm.set_backend("numpy" | "cupy" | "auto")
    with xlstm.use_backend("numpy"): ...
    xlstm.available_backends()

The default comes from the environment variable ``XLSTM_BACKEND`` (``auto`` when unset).
``auto`` picks CuPy when a CUDA device is usable and NumPy otherwise, and says which once.
An explicit ``cupy`` on a machine that cannot run it raises :class:`BackendUnavailableError`
with the reason; it never computes silently on the CPU.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

from ..errors import BackendUnavailableError, InputError
from .base import Backend, is_device_array
from .numpy_backend import NumpyBackend

NAMES = ("numpy", "cupy", "auto")

_instances: dict[str, Backend] = {}
_current: Backend | None = None
_auto_announced = False


def _cupy_backend() -> Backend:
    if "cupy" not in _instances:
        from . import cupy_backend  # imports cupy lazily, inside the module's functions

        reason = cupy_backend.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(
                f"the 'cupy' backend cannot run here: {reason}. "
                "To run on the CPU use the 'numpy' backend (xlstm.set_backend('numpy'), "
                "XLSTM_BACKEND=numpy, or --backend numpy on the command line), or 'auto' to pick "
                "CuPy only where it works.")
        _instances["cupy"] = cupy_backend.CupyBackend()
    return _instances["cupy"]


def cupy_unavailable_reason() -> str | None:
    """Why the CuPy backend cannot run here, or None when it can."""
    from . import cupy_backend

    return cupy_backend.unavailable_reason()


def use_cuda_device(index: int) -> None:
    """Make CUDA device ``index`` current for CuPy in this process (one GPU per data-parallel rank);
    call it before anything touches a GPU, or device 0 gets a context in every process."""
    from . import cupy_backend

    cupy_backend.use_device(index)


def default_name() -> str:
    """The backend name the environment asks for: ``$XLSTM_BACKEND``, else 'auto'."""
    return os.environ.get("XLSTM_BACKEND", "auto") or "auto"


def resolve(name: str | Backend | None = None, announce: bool = True) -> Backend:
    """The backend object for a name ('numpy', 'cupy', 'auto'), a Backend, or None (the current one).

    'auto' says on stderr, once, when it falls back to NumPy although CuPy is installed (a GPU
    package that cannot run is worth knowing about); ``announce=False`` keeps it quiet.
    """
    global _auto_announced
    if name is None:
        return get_backend(announce)
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise InputError(f"backend must be one of {NAMES}, got {name!r}")
    name = name.lower()
    if name == "numpy":
        return _instances.setdefault("numpy", NumpyBackend())
    if name == "cupy":
        return _cupy_backend()
    reason = cupy_unavailable_reason()
    chosen = resolve("numpy") if reason else _cupy_backend()
    if reason and announce and not _auto_announced and importlib.util.find_spec("cupy") is not None:
        _auto_announced = True
        print(f"xlstm: backend 'auto' chose 'numpy': cupy is installed but cannot run ({reason})", file=sys.stderr)
    return chosen


def get_backend(announce: bool = True) -> Backend:
    """The current backend (from set_backend, use_backend, or XLSTM_BACKEND; default 'auto')."""
    global _current
    if _current is None:
        _current = resolve(default_name(), announce)
    return _current


def set_backend(name: str | Backend) -> Backend:
    """Make ``name`` the current backend for models created from now on; returns it."""
    global _current
    _current = resolve(name)
    return _current


@contextlib.contextmanager
def use_backend(name: str | Backend):
    """Context manager: the current backend is ``name`` inside the block, restored after."""
    global _current
    previous = _current
    _current = resolve(name)
    try:
        yield _current
    finally:
        _current = previous


def available_backends() -> list[str]:
    """Names of the backends that can run here, e.g. ``['numpy']`` on a machine without a GPU."""
    names = ["numpy"]
    if cupy_unavailable_reason() is None:
        names.append("cupy")
    return names


def backend_of(array) -> Backend:
    """The backend that owns ``array`` (NumPy arrays -> numpy, CuPy arrays -> cupy)."""
    if is_device_array(array):
        return _cupy_backend()
    return resolve("numpy")


__all__ = ["Backend", "get_backend", "set_backend", "use_backend", "available_backends",
           "resolve", "backend_of", "cupy_unavailable_reason", "is_device_array"]
