"""CuPy arrays shared with another framework's CUDA tensors (DLPack), on that framework's stream.

    with on_stream(stream_ptr, device):       # e.g. torch.cuda.current_stream().cuda_stream
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
def on_stream(ptr: int, device: int):
    """Make CUDA device ``device`` and the external stream ``ptr`` (a cudaStream_t) CuPy's current."""
    import cupy

    with cupy.cuda.Device(device):
        # 0 is the legacy default stream, which cupy names Stream.null
        stream = cupy.cuda.Stream.null if ptr == 0 else cupy.cuda.ExternalStream(ptr, device)
        with stream:
            yield
