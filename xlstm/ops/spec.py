"""The declared contract of an op: its arguments, what it reads and writes, its kernels, its scratch.

An ``OpSpec`` is written once, in the op's module, and everything that needs the contract
reads it from there: the CUDA-graph cache (which arrays to copy in and out, ``reads``/``writes``),
the kernel-name lists the compile tests check (``xlstm.kernels.entry_names``), the CuPy
launches (``kernel_args``: each argument checked for dtype, shape and layout, then put in the
kernel's parameter order), and what a capture must prepare (kernels, scratch).

Shapes are symbolic: a tuple of dimension names ("T", "B", "H", "n", ...), each optionally
times an integer factor or plus one ("4H", "10H", "T+1"); ``shape(arg, dims)`` evaluates one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..kernels import MAIN_SOURCE

_DIM = re.compile(r"(\d*)([A-Za-z]\w*)(?:\+(\d+))?")


def dim(expr, dims: dict) -> int:
    """One symbolic dimension ("4H", "T+1", "B", or an int) evaluated in ``dims``."""
    if isinstance(expr, int):
        return expr
    m = _DIM.fullmatch(expr)
    if m is None:
        raise ValueError(f"bad dimension {expr!r}")
    k, name, plus = m.groups()
    return (int(k) if k else 1) * dims[name] + (int(plus) if plus else 0)


@dataclass(frozen=True)
class Arg:
    """An array argument.

    io: "in" (read), "out" (written, its old value unused), "inout" (read then written),
    "acc" (read and accumulated into, +=). ``first``: only index 0 along the first axis is
    read (the initial state of a [T+1,...] buffer). ``dtype``: "T" (the op's float dtype) or a
    NumPy dtype name. ``optional``: may be None (a NULL pointer in the kernel).
    """
    name: str
    shape: tuple
    io: str = "in"
    optional: bool = False
    first: bool = False
    dtype: str = "T"
    doc: str = ""

    @property
    def read(self) -> bool:
        return self.io in ("in", "inout", "acc")

    @property
    def written(self) -> bool:
        return self.io in ("out", "inout", "acc")


@dataclass(frozen=True)
class Scalar:
    """A scalar argument; ``dtype`` "T" is passed to a kernel as the op's float type."""
    name: str
    dtype: str = "T"
    doc: str = ""


@dataclass(frozen=True)
class Kernel:
    """A CUDA entry point (``name_f32``/``name_f64``, or ``name`` alone when ``typed`` is False)
    and its parameters: names of the op's arguments, of its scratch, or of dimensions (passed
    as int64), in the kernel file ``source`` of ``xlstm/kernels``."""
    name: str
    params: tuple = ()
    typed: bool = True
    source: str = MAIN_SOURCE


@dataclass(frozen=True)
class OpSpec:
    """One op: its arguments in call order, the kernels it launches, the scratch it needs.

    ``scratch``:
    ``Arg``s of buffers the op allocates once per shape (a CUDA-graph capture prepares them).
    ``steps``: for a sequence op, the per-step ops its loop runs (their kernels are its kernels).
    """
    name: str
    args: tuple
    kernels: tuple = ()
    scratch: tuple = ()
    steps: tuple = ()
    summary: str = ""
    _by_name: dict = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {a.name: a for a in self.args + self.scratch})

    def __getitem__(self, name: str):
        return self._by_name[name]

    def arrays(self) -> tuple:
        return tuple(a for a in self.args if isinstance(a, Arg))

    def reads(self) -> dict:
        """{array name: "first" | "all"} of every array the op reads, in call order."""
        return {a.name: "first" if a.first else "all" for a in self.arrays() if a.read}

    def writes(self) -> tuple:
        """Names of the arrays the op writes, in call order."""
        return tuple(a.name for a in self.arrays() if a.written)

    def shape(self, name: str, dims: dict) -> tuple:
        """The concrete shape of argument or scratch ``name`` for these dimensions."""
        return tuple(dim(d, dims) for d in self[name].shape)

    def kernel(self, name: str) -> Kernel:
        for k in self.kernels:
            if k.name == name:
                return k
        raise KeyError(f"op {self.name!r} has no kernel {name!r}")

    def kernel_args(self, name: str, values: dict, dims: dict, check, scalar) -> tuple:
        """The parameters of kernel ``name`` in its order: ``check(arg, value, shape)`` for each
        array (it returns the value or a NULL pointer), ``scalar(param, value)`` for each scalar,
        int64 for each dimension."""
        import numpy as np

        out = []
        for p in self.kernel(name).params:
            spec = self._by_name.get(p)
            if spec is None:
                out.append(np.int64(dims[p]))
            elif isinstance(spec, Scalar):
                out.append(scalar(spec, values[p]))
            else:
                out.append(check(spec, values[p], self.shape(p, dims)))
        return tuple(out)
