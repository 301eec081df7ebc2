"""Flat buffers: many arrays as consecutive views of one 1-D buffer, declared as such.

    views = flat.views(buffer, shapes)    # arrays of these shapes filling ``buffer``, in order
    flat.buffer_of(arrays)                # ``buffer`` when ``arrays`` are exactly those views, else None
    FlatGrads(model), FlatParams(model)   # every gradient / parameter of a model made such views

A buffer made by ``views`` is recorded with its views (weakly: the record goes when the buffer
does), so a caller handed a list of arrays knows that one pass over the buffer is a pass over
all of them, because it made them so, not because their addresses happen to line up: the optimiser's update,
the gradient clipping and zeroing (one launch instead of one per array on the GPU), and the
data-parallel all-reduce (one collective per buffer).
"""
from __future__ import annotations

import weakref

from .errors import StateError

_declared: dict = {}       # id(buffer) -> (weakref to the buffer, ((offset, shape) of each view, ...))


def views(buffer, shapes) -> list:
    """Views of the 1-D ``buffer`` with these shapes, consecutive and filling it, declared."""
    out, layout, off = [], [], 0
    for s in shapes:
        s = tuple(int(d) for d in s)
        n = 1
        for d in s:
            n *= d
        out.append(buffer[off:off + n].reshape(s))
        layout.append((off, s))
        off += n
    if buffer.ndim != 1 or off != buffer.size:
        raise ValueError(f"shapes {list(shapes)} hold {off} elements; the buffer has shape {tuple(buffer.shape)}")
    key = id(buffer)
    _declared[key] = (weakref.ref(buffer), tuple(layout))
    weakref.finalize(buffer, _declared.pop, key, None)
    return out


def buffer_of(arrays):
    """The flat buffer whose declared views ``arrays`` are, all of them in order; else None.

    An array counts as a declared view when it is one over exactly that view's memory (an
    in-place operator may hand back a new array object of the same view)."""
    if not arrays:
        return None
    base = getattr(arrays[0], "base", None)
    entry = None if base is None else _declared.get(id(base))
    if entry is None or entry[0]() is not base or len(entry[1]) != len(arrays):
        return None
    start, item = _address(base), base.dtype.itemsize
    for a, (off, shape) in zip(arrays, entry[1]):
        if a.base is not base or a.shape != shape or not a.flags.c_contiguous or a.dtype != base.dtype \
                or _address(a) != start + off * item:
            return None
    return base


def _address(a) -> int:
    ai = getattr(a, "__array_interface__", None)
    return ai["data"][0] if ai is not None else a.data.ptr


def buffer_or(arrays) -> list:
    """``[buffer]`` where ``arrays`` are a flat buffer's declared views, else ``arrays``."""
    b = buffer_of(arrays)
    return arrays if b is None else [b]


class FlatGrads:
    """Every gradient of a model made a view of one flat buffer per dtype (model order).

    Backward accumulates into ``grads`` in place (``+=``, ``matmul_add``, ``add.at``), so the
    views stay the arrays it writes, and one all-reduce per buffer covers every parameter.
    """

    what = "grads"

    def __init__(self, model):
        modules = list(model.modules) if hasattr(model, "modules") else [model]
        groups: dict = {}
        for m in modules:
            for k, g in getattr(m, self.what).items():
                groups.setdefault(g.dtype.str, []).append((m, k, g))
        self.buffers, self._views = [], []
        for items in groups.values():
            buf = model.backend.xp.zeros(sum(int(g.size) for _, _, g in items), dtype=items[0][2].dtype)
            for (m, k, g), view in zip(items, views(buf, [g.shape for _, _, g in items])):
                view[...] = g            # start from the current values
                getattr(m, self.what)[k] = view
                self._views.append((m, k, view))
            self.buffers.append(buf)

    def check(self) -> None:
        """Raise when a module replaced a gradient array: the all-reduce would miss its gradient."""
        for m, k, view in self._views:
            if getattr(m, self.what).get(k) is not view:
                raise StateError(f"{type(m).__name__}.grads[{k!r}] is no longer the array it was: data-parallel "
                                 "training needs backward to accumulate into the gradients in place")


class FlatParams(FlatGrads):
    """Every parameter made a view of one flat buffer per dtype (model order), so that Adam
    updates them all in one pass (``optim.Adam``; one kernel launch on CuPy). Optimisers and
    ``load_state_dict`` write parameters in place, so the views stay; ``module.to`` replaces
    them, and Adam then updates tensor by tensor."""

    what = "params"
