"""Gate order and activations.

Gates are stored blocked along the last axis in the order **i, f, g, o** (PyTorch/cuDNN order):
``z[..., 0:H]`` input gate, ``z[..., H:2H]`` forget gate, ``z[..., 2H:3H]`` candidate
(TensorFlow's ``j``, the seed article's ``Cproj``), ``z[..., 3H:4H]`` output gate.
TensorFlow orders its kernel columns ``i, j, f, o``; ``interop`` reorders.
"""
from __future__ import annotations

ORDER = ("i", "f", "g", "o")
TF_TO_OURS = (0, 2, 1, 3)                # our gate k is TensorFlow's block TF_TO_OURS[k]


def split(z, H: int):
    """Views (i, f, g, o) of a [..., 4H] array."""
    return z[..., :H], z[..., H:2 * H], z[..., 2 * H:3 * H], z[..., 3 * H:]


def sigmoid(xp, x):
    """1 / (1 + exp(-x)) written as 0.5 * tanh(0.5 x) + 0.5, which never overflows."""
    return 0.5 * xp.tanh(0.5 * x) + 0.5

