"""CUDA C++ sources of the fused kernels, shipped as package data.

``lstm_pointwise.cuh`` holds the pointwise math as ``__host__ __device__`` functions (also
compiled by g++ for the host checks); ``lstm_kernels.cu`` holds the per-step ``extern "C"``
kernels, ``optim.cuh`` the Adam update of one element (the kernel ``adam_step``) and the
fixed-order norm of global-norm clipping (``grad_norm``, ``clip_by_norm``), ``xent.cuh`` one
row of softmax cross-entropy (``softmax_xent``).
``lstm_persistent.cuh`` / ``lstm_persistent.cu`` hold the persistent kernels (all T
steps in one cooperative launch), a module of their own because it is launched cooperatively.
Which entry points each file has is declared by the ops' specs (``xlstm/ops``), not here.
This module only reads the sources; it imports nothing from CUDA, so it works on any machine.
"""
from __future__ import annotations

import re
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent
MAIN_SOURCE = "lstm_kernels.cu"
PERSISTENT_SOURCE = "lstm_persistent.cu"
SOURCES = (MAIN_SOURCE, PERSISTENT_SOURCE)

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)


def kernel_path(name: str = MAIN_SOURCE) -> Path:
    """Path of a source file in this folder (for nvcc's command line)."""
    return KERNELS_DIR / name


def kernel_source(name: str = MAIN_SOURCE) -> str:
    """The text of ``name`` with every ``#include "x"`` of this folder pasted in, once each.

    Inlining (rather than passing ``-I`` to NVRTC) makes the source self-contained, so cupy's
    on-disk kernel cache, which is keyed by the source text and options, sees a header change.
    """
    seen: set[str] = set()

    def expand(fname: str) -> str:
        text = (KERNELS_DIR / fname).read_text(encoding="utf-8")

        def repl(m: re.Match) -> str:
            inc = m.group(1)
            if not (KERNELS_DIR / inc).is_file():
                return m.group(0)           # not ours: leave it to the compiler
            if inc in seen:
                return f"// {inc} already included above"
            seen.add(inc)
            return f"// ---- begin {inc} ----\n{expand(inc)}\n// ---- end {inc} ----"

        return _INCLUDE.sub(repl, text)

    seen.add(name)
    return expand(name)


DTYPE_SUFFIX = {"float32": "f32", "float64": "f64"}
