"""The ops: one module per fused computation, each holding its declared spec (``spec.OpSpec``),
a pointer to or the text of its readable reference, its NumPy implementation and its CuPy launch.

    lstm_cell          the plain cell's step, forward and backward
    ln_lstm_cell       the LayerNorm cell's step, forward and backward
    lstm_sequence      the time loops of both cells (the reference per-step loop, NumPy's
                       hoisted forward and vectorised BPTT, CuPy's persistent/graph dispatch)
    gemm               matmul, matmul_add, gemm_operand in float32 / tf32 / bf16
    adam               one Adam/AdamW update of flat buffers
    clip               global-norm clipping of a flat gradient buffer (CuPy)
    softmax_xent       softmax cross-entropy rows and their gradient
    embedding_scatter  the embedding gradient's deterministic scatter-add

This registry is the one list of them: ``SPECS`` by op name, ``implementations(device)`` (what
a backend class installs as its methods, see ``install``), and the CUDA entry points of each
kernel file (``kernel_names``, ``entry_names``: the compile tests check them against the sources).
Nothing here imports cupy: a CuPy launch goes through its backend (``be.launch``, ``be.xp``).
"""
from __future__ import annotations

from . import adam, clip, embedding_scatter, gemm, ln_lstm_cell, lstm_cell, lstm_sequence, softmax_xent
from ..kernels import DTYPE_SUFFIX, MAIN_SOURCE
from .spec import Arg, Kernel, OpSpec, Scalar

MODULES = (lstm_cell, ln_lstm_cell, lstm_sequence, gemm, adam, clip, softmax_xent, embedding_scatter)
SPECS: dict = {s.name: s for m in MODULES for s in m.SPECS}
DEVICES = ("numpy", "cupy")

# every backend's reference of the sequence ops: the per-step loop over its step ops
REFERENCE = dict(lstm_sequence.LOOPS)


def implementations(device: str) -> dict:
    """{method name: function(backend, ...)} of ``device`` ("numpy" or "cupy"), from every op module."""
    if device not in DEVICES:
        raise KeyError(f"no ops for device {device!r}; devices: {DEVICES}")
    out: dict = {}
    for m in MODULES:
        out.update(getattr(m, device.upper(), {}))
    return out


def install(cls, device: str) -> None:
    """Make every op of ``device`` a method of the backend class ``cls`` (no call-time dispatch:
    ``be.lstm_forward_step(...)`` is the op module's function called with ``be``)."""
    for name, fn in implementations(device).items():
        setattr(cls, name, fn)
    cls.op_names = frozenset(implementations(device))


def kernels(source: str, typed: bool = True) -> tuple:
    """The ``Kernel``s of kernel file ``source`` (dtype-suffixed ones, or the fixed-type ones),
    in registry order, each once."""
    seen: dict = {}
    for s in SPECS.values():
        for k in s.kernels:
            if k.source == source and k.typed == typed:
                seen.setdefault(k.name, k)
    return tuple(seen.values())


def kernel_names(source: str = MAIN_SOURCE, typed: bool = True) -> tuple:
    """Names of the kernels of ``source`` (without the dtype suffix)."""
    return tuple(k.name for k in kernels(source, typed))


def entry_names(source: str = MAIN_SOURCE) -> list[str]:
    """Every extern "C" kernel name the specs declare in ``source``, e.g. ``lstm_forward_step_f32``
    (the compile tests check that each one is in the compiled module)."""
    return [f"{k}_{s}" for k in kernel_names(source) for s in DTYPE_SUFFIX.values()] + \
        list(kernel_names(source, typed=False))


__all__ = ["Arg", "Kernel", "OpSpec", "Scalar", "SPECS", "REFERENCE", "implementations", "install",
           "kernels", "kernel_names", "entry_names"]
