"""Input validation shared by every layer: rank, shape, dtype, backend, finiteness.

``host_numpy`` turns foreign arrays (torch, cupy, lists) into NumPy for the weight importers.

Each failure raises ``InputError`` (a ``ValueError``) naming the argument, what was expected
and what came in, so no input is ever computed on silently wrong.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .errors import InputError

# Checks of device (cupy) arrays queued by ``deferred()``: (backend, 0-d bool "ok" on the device,
# message or a function giving it). None: every check reads its flag at once.
_pending: list | None = None


def _is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


def host_numpy(a) -> np.ndarray:
    """``a`` as a NumPy array on the host: torch tensors (detached), cupy arrays, lists."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    elif _is_cupy(a):
        a = a.get()
    return np.asarray(a)


def as_array(backend, a, name: str, dtype=None, ndim: int | None = None,
             shape: tuple | None = None, finite: bool = True, dims: str = ""):
    """``a`` as an array of ``backend``, checked.

    dtype: required dtype (float arrays of another float dtype are refused, not cast, so a
        float64 model never silently runs on float32 data); ints/lists are converted.
    ndim / shape: expected rank / shape (None entries in ``shape`` match anything);
    dims: names of the axes for messages, e.g. "[T,B,D]".
    finite: refuse NaN and Inf.
    """
    if a is None:
        raise InputError(f"{name} is None; expected an array {dims}".rstrip())
    if _is_cupy(a) and backend.name != "cupy":
        raise InputError(f"{name} is a cupy (GPU) array but the model lives on the '{backend.name}' "
                         f"backend; move the model with .to('cupy') or the array with .get()")
    if not _is_cupy(a):
        from_python = not isinstance(a, np.ndarray)
        a = np.asarray(a)
        if a.dtype.kind not in "iubf":
            raise InputError(f"{name} could not be read as a numeric array (got dtype {a.dtype}); "
                             f"pass a float array {dims}".rstrip())
        # ints, bools and Python lists carry no float precision of their own: convert them.
        # A float array of the other precision is refused below instead of silently cast.
        if dtype is not None and (from_python or a.dtype.kind in "iub"):
            a = a.astype(dtype)
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise InputError(f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)} (the model's dtype); "
                         f"convert it with .astype('{np.dtype(dtype)}') or build the model with dtype='{a.dtype}'")
    if ndim is not None and a.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions {dims}, got shape {tuple(a.shape)}".replace("  ", " "))
    if shape is not None:
        if len(shape) != a.ndim or any(s is not None and s != t for s, t in zip(shape, a.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise InputError(f"{name} has shape {tuple(a.shape)}, expected {want} {dims}".rstrip())
    a = backend.asarray(a)
    if finite and a.dtype.kind == "f" and a.size:
        require(backend, backend.xp.isfinite(a).all(),
                f"{name} contains NaN or Inf; clean the data (or check the previous layer) first")
    return a


def require(backend, ok, message) -> None:
    """Raise InputError(message) unless ``ok`` (a bool, or a 0-d bool array of ``backend``).

    A device array's flag is not read here while ``deferred()`` is active: it is queued and read,
    with all the others in one transfer, by ``flush()``, so a training step does not wait for
    the device to validate its inputs. ``message``: a string, or a function returning one
    (called only on failure, so it may read device values).
    """
    if _pending is not None and _is_cupy(ok):
        _pending.append((backend, ok, message))
        return
    if not bool(ok):
        raise InputError(message() if callable(message) else message)


def check_range(backend, a, name: str, lo: int, hi: int, what: str) -> None:
    """Raise unless every value of the integer array ``a`` lies in [lo, hi); ``what`` names hi.

    A host array is checked on the host (free); a device array through ``require``.
    """
    if not a.size:
        return
    msg = lambda: (f"{name} must lie in [{lo}, {hi}) ({what}), "  # noqa: E731
                   f"got values in [{int(a.min())}, {int(a.max())}]")
    if not _is_cupy(a):
        if a.min() < lo or a.max() >= hi:
            raise InputError(msg())
        return
    require(backend, (a.min() >= lo) & (a.max() < hi), msg)


@contextlib.contextmanager
def deferred(read: bool = True):
    """Within: device-array checks queue their flags (see ``require``); ``flush()`` reads them.

    Leaving the block normally flushes; with ``read=False`` the outermost block drops the queued
    flags unread instead (a caller that must never wait on the device, such as ``xlstm.torch``
    on torch's stream, where NaN and Inf then propagate as in torch). Nested blocks share the
    outer queue.
    """
    global _pending
    outer = _pending
    if outer is None:
        _pending = []
    try:
        yield
        if outer is None and read:
            flush()
    finally:
        if outer is None:
            _pending = None


def flush() -> None:
    """Read every queued check (one device->host transfer per backend) and raise the first failure."""
    if not _pending:
        return
    queued = list(_pending)
    _pending.clear()
    backend = queued[0][0]
    ok = backend.to_numpy(backend.xp.stack([f for _, f, _ in queued]))
    for (_, _, message), good in zip(queued, ok):
        if not good:
            raise InputError(message() if callable(message) else message)
