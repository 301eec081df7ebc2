"""CUDA-graph replay of the CuPy backend's sequence ops (a layer-direction's whole time loop).

The first call of a shape key runs the op's eager loop (``Backend``'s per-step GEMM + fused
kernel) inside CUDA stream capture; the captured graph is launched for that call and replayed
for every later call of the key. Per call the host then issues a handful of copies and one
graph launch instead of 2T Python-side launches.

Key: (op, dtype, every array argument's shape or None, every scalar argument's value, the
current device), so T, B, H, which masks are present, forget_bias, eps, the GEMMs'
``precision`` and the GPU all select the graph. A tf32/bf16 weight operand
(``xlstm.precision.Rounded``: U or U^T prepared once per call by ``gemm_operand``) is an input
like U: its data (bf16 bits or float32), shape and layout go into the key, and its data is
copied into a graph-owned buffer per call.

Buffers: a graph owns every array it touches (allocated once, at capture; the graph has their
addresses baked in). Per call the arrays the op reads are copied into those buffers before the
launch and the arrays it writes are copied back out after it, all on the caller's stream, in
order. Binding the layer's own buffers by stable address instead would save those copies but
would make two calls of one shape share storage: a model's layers and directions of equal
shape share one graph here, and a forward's stored gates must survive the next forward.
The copies are device-to-device and cost a few % of the loop they replace.

Nothing in the captured region waits for the device: the layer checks its inputs for NaN/Inf
before it calls the op (``xlstm.checks.as_array``), the pointwise steps only launch, and the
GEMMs go through ``CublasGemm`` (CuPy's cuBLAS wrappers refuse capture). No allocation happens
during capture either: buffers, kernels and scratch are prepared before ``begin_capture``.

The cache is an LRU of at most ``maxsize`` graphs; evicting one frees its buffers once no
graph launch still uses them (CuPy's pool frees on the stream order).

A capture or first launch that fails for a reason of the device or its libraries (a kernel
that refuses capture, a driver without some graph feature) raises ``CaptureFailed``; nothing
of the caller's arrays has been written then, so the backend runs the same op eagerly and
turns graphs off (``CupyBackend.graph_or_eager``). An ``XlstmError`` from the op itself (a bad
argument) is the caller's and propagates as is.
"""
from __future__ import annotations

import collections
import functools
import inspect
import time

from .. import ops
from ..errors import XlstmError
from ..precision import Rounded


class CaptureFailed(RuntimeError):
    """Capturing or first launching a graph failed; the message says why. Nothing was written
    to the caller's arrays: running the op eagerly instead is safe."""


# For each sequence op, from its spec (``xlstm.ops.lstm_sequence``): the array arguments it reads
# ("all", or "first" = only index 0 along T: the initial state) and the ones it writes.
# Everything else is an output only or a scalar.
SPECS = {name: dict(read=ops.SPECS[name].reads(), write=ops.SPECS[name].writes()) for name in ops.REFERENCE}


class _Entry:
    """One captured op: the graph, the buffers it is bound to, and what they cost."""

    def __init__(self, graph, buffers, keep, nbytes, capture_s):
        self.graph, self.buffers, self.keep = graph, buffers, keep
        self.nbytes, self.capture_s, self.replays = nbytes, capture_s, 0


class GraphCache:
    """LRU cache of captured sequence ops of one backend; ``run`` is the only entry point."""

    def __init__(self, maxsize: int = 16):
        self.maxsize = maxsize
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.captures = 0          # graphs captured (first calls of a key, re-captures after eviction)
        self.replays = 0           # calls served by an already captured graph
        self.capture_seconds = 0.0  # host time spent capturing and instantiating
        self.failure: str | None = None   # why a capture failed (the backend then runs eagerly)

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return list(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def stats(self) -> dict:
        """entries, bytes of the buffers the cached graphs own, captures, replays, capture time."""
        return dict(entries=len(self._entries), bytes=sum(e.nbytes for e in self._entries.values()),
                    captures=self.captures, replays=self.replays,
                    capture_seconds=self.capture_seconds, failure=self.failure)

    @staticmethod
    def key(op: str, args: dict):
        parts = [op]
        for name, a in args.items():
            if a is None:
                parts.append((name, None))
            elif isinstance(a, Rounded):
                parts.append((name, a.precision, a.transposed, tuple(a.data.shape), a.data.dtype.str))
            elif hasattr(a, "shape") and hasattr(a, "dtype"):
                parts.append((name, tuple(a.shape), a.dtype.str))
            elif isinstance(a, str):
                parts.append((name, a))
            else:
                parts.append((name, float(a)))
        return tuple(parts)

    def run(self, be, op: str, fn, args: dict) -> None:
        """``fn(be, **args)`` (the eager loop) served by a graph: capture on a key's first call."""
        # a graph, its buffers and its kernels belong to the device current at capture
        key = self.key(op, args) + (("device", be.xp.cuda.runtime.getDevice()),)
        entry = self._entries.get(key)
        first = entry is None
        if first:
            entry = self._capture(be, op, fn, args)
        else:
            self._entries.move_to_end(key)
            entry.replays += 1
            self.replays += 1
        spec = SPECS[op]
        bufs = entry.buffers
        for name, part in spec["read"].items():
            a = args[name]
            if a is not None:
                if isinstance(a, Rounded):
                    bufs[name].data[...] = a.data
                elif part == "first":
                    bufs[name][0] = a[0]
                else:
                    bufs[name][...] = a
        try:
            entry.graph.launch(be.xp.cuda.get_current_stream())
        except Exception as e:
            if not first:
                raise
            raise CaptureFailed(f"{op}: the first launch of the captured graph failed "
                                f"({type(e).__name__}: {e})") from e
        if first:               # cached once it has run: a graph that cannot launch is dropped
            self._entries[key] = entry
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        for name in spec["write"]:
            args[name][...] = bufs[name]

    def _capture(self, be, op, fn, args) -> _Entry:
        xp = be.xp
        t0 = time.perf_counter()
        buffers, nbytes = {}, 0
        for name, a in args.items():
            if isinstance(a, Rounded):
                buffers[name] = Rounded(xp.empty(a.data.shape, a.data.dtype), a.precision, a.transposed)
                nbytes += buffers[name].data.nbytes
            elif hasattr(a, "shape") and hasattr(a, "dtype"):
                buffers[name] = xp.empty(a.shape, a.dtype)
                nbytes += buffers[name].nbytes
            else:
                buffers[name] = a
        keep = be.prepare_capture(op, args)     # kernels compiled, scratch allocated, now
        nbytes += sum(getattr(k, "nbytes", 0) for k in keep)
        try:
            graph = capture(xp, lambda: fn(be, **buffers))
        except CaptureFailed as e:
            raise CaptureFailed(f"{op}: {e}") from e.__cause__
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        return _Entry(graph, buffers, keep, nbytes, time.perf_counter() - t0)


def capture(xp, fn):
    """The work ``fn()`` issues, captured on a fresh non-blocking stream into a graph (not run).

    Everything ``fn`` needs (kernels, handles, scratch) must exist before: capture must not
    allocate. An error inside ends the capture; an ``XlstmError`` (a bad argument of the op) is
    raised as is, any other (CUDA, cuBLAS, the driver) as ``CaptureFailed`` with the reason."""
    stream = xp.cuda.Stream(non_blocking=True)
    try:
        with stream:
            stream.begin_capture()
            try:
                fn()
            except BaseException:
                try:                       # end the capture; fn's own error is the news
                    stream.end_capture()
                except Exception:
                    pass
                raise
            return stream.end_capture()
    except XlstmError:
        raise
    except Exception as e:
        raise CaptureFailed(f"{type(e).__name__}: {e}") from e


@functools.lru_cache(maxsize=None)
def _signature(fn):
    return inspect.signature(fn)


def bind(fn, be, args, kwargs) -> dict:
    """The op's arguments by name, defaults filled in (``fn`` is the op's reference loop,
    ``fn(be, ...)``)."""
    bound = _signature(fn).bind(be, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(out)))            # the backend
    return out
