"""CuPy arrays shared with another framework's CUDA tensors (DLPack), on that framework's stream.

    with on_stream(stream, device):           # e.g. torch.cuda.current_stream()
        a = from_dlpack(tensor)               # a cupy view of the tensor's memory (no copy)
        ...                                   # every kernel and GEMM queued on that stream

Work queued inside the block is ordered after whatever the framework queued on the stream and
before what it queues next, so nothing races and nothing waits on the host.
"""
from __future__ import annotations

import contextlib


def from_dlpack(tensor):
    """A cupy array viewing ``tensor``'s device memory (any object with ``__dlpack__``)."""
    import cupy

    return cupy.from_dlpack(tensor)


@contextlib.contextmanager
def on_stream(stream, device: int):
    """Make CUDA device ``device`` and ``stream`` CuPy's current: a framework's stream object
    (``torch.cuda.current_stream()``: it has ``cuda_stream`` and ``__cuda_stream__``) or a
    cudaStream_t as an int."""
    import cupy

    ptr = stream if isinstance(stream, int) else int(stream.cuda_stream)
    with cupy.cuda.Device(device):
        if ptr == 0:                    # the legacy default stream, which cupy names Stream.null
            s = cupy.cuda.Stream.null
        elif hasattr(stream, "__cuda_stream__") and hasattr(cupy.cuda.Stream, "from_external"):
            s = cupy.cuda.Stream.from_external(stream)      # cupy >= 14: ExternalStream is deprecated
        else:
            s = cupy.cuda.ExternalStream(ptr, device)
        with s:
            yield
