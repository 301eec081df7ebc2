"""CuPy backend: the same pointwise LSTM step as fused CUDA kernels (``xlstm/kernels``).

This is the only module (with its package) that imports cupy, and it does so lazily, so
``import xlstm`` works on machines without cupy or without a GPU.
"""
from __future__ import annotations

import functools

from .base import Backend


def _nvidia_driver_present() -> bool:
    """True when the kernel driver or libcuda is visible (Linux and Windows)."""
    import ctypes.util
    import os

    return os.path.exists("/proc/driver/nvidia/version") or ctypes.util.find_library("cuda") is not None \
        or ctypes.util.find_library("nvcuda") is not None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why CuPy cannot run here (cupy missing / no device / driver too old), or None."""
    try:
        import cupy
    except ImportError as e:
        return (f"cupy is not installed ({e}); install it with "
                "`pip install 'xlstm[cuda12]'` or `pip install 'xlstm[cuda13]'` to match your CUDA driver")
    except Exception as e:  # a broken install raises other errors on import
        return f"cupy failed to import ({type(e).__name__}: {e}); reinstall the cupy wheel matching your CUDA"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        msg = str(e)
        if not _nvidia_driver_present():
            return (f"no NVIDIA GPU driver on this machine ({type(e).__name__}: {msg}); "
                    "run on a machine with an NVIDIA GPU and its driver, or use the 'numpy' backend")
        if "insufficient" in msg.lower() or "driver" in msg.lower():
            return (f"the NVIDIA driver is too old or missing for this cupy build ({msg}); "
                    "update the driver or install the cupy wheel for your CUDA version")
        return f"no usable CUDA device ({type(e).__name__}: {msg})"
    if n < 1:
        return "no CUDA device found (cupy sees 0 devices)"
    try:
        cupy.zeros(1).sum().item()
    except Exception as e:
        return f"a CUDA device exists but cannot run work ({type(e).__name__}: {e})"
    return None


class CupyBackend(Backend):
    name = "cupy"

    def __init__(self):
        import cupy

        self.xp = cupy

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return self.xp.asnumpy(a)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()
