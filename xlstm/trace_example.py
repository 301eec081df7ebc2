"""``xlstm trace``: the tiny traced example (TensorFlow's section-1 cell), printed per step.

Kept apart from ``xlstm/trace.py`` because it builds a model through ``xlstm.interop``, which
imports ``xlstm.lstm``, which imports ``xlstm.trace`` for ``trace=True``: the recorder must not
import its own caller back.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .interop import from_tf, from_tf_bidirectional


def add_arguments(parser) -> None:
    parser.add_argument("--layer-norm", action="store_true", help="the LayerNorm LSTM cell")
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--seq-len", type=int, default=3)
    parser.add_argument("--save", metavar="PATH", help="also write the trace to PATH (.npz)")


def example(layer_norm: bool = False, bidirectional: bool = False, T: int = 3):
    """The tiny traced example: T steps, B=1, D=3, H=2, TensorFlow's section-1 cell
    (kernel and bias 0.5, forget_bias 1, h0=[0.2,0.3], c0=[0,0.1]), x=1, loss = sum(y).

    With layer_norm: H=3 and a kernel that varies by entry (layer norm maps any 2 distinct
    values to -1, +1 and all-equal units to 0, so H=2 or a constant kernel shows nothing),
    gain 1, shift 0; h0 = [0.2, 0.3, 0.4], c0 = [0, 0.1, 0.2]. Returns (lstm, trace).
    """
    D, H = 3, (3 if layer_norm else 2)
    if T < 1:
        raise InputError(f"--seq-len must be at least 1, got {T}")
    kernel = np.full((D + H, 4 * H), 0.5)
    bias = np.full(4 * H, 0.5)
    lnp = None
    if layer_norm:
        kernel = 0.5 + 0.1 * ((np.arange(kernel.size).reshape(kernel.shape) * 7) % 11 - 5)
        lnp = [{n: (np.ones(H), np.zeros(H)) for n in ("input", "transform", "forget", "output", "state")}]
    if bidirectional:
        lstm = from_tf_bidirectional([kernel], [kernel[::-1].copy()], None if layer_norm else [bias],
                                     None if layer_norm else [bias], layer_norm=lnp,
                                     layer_norm_bw=lnp, dtype="float64", backend="numpy")
    else:
        lstm = from_tf([kernel], [None if layer_norm else bias], layer_norm=lnp, dtype="float64", backend="numpy")
    S = lstm.num_layers * lstm.num_directions
    h0 = np.tile(0.2 + 0.1 * np.arange(H), (S, 1, 1))
    c0 = np.tile(0.1 * np.arange(H), (S, 1, 1))
    x = np.ones((T, 1, D))
    y, _ = lstm.forward(x, (h0, c0), trace=True)
    lstm.backward(np.ones_like(y), trace=True)
    return lstm, lstm.last_trace


def run(args) -> int:
    _, tr = example(args.layer_norm, args.bidirectional, args.seq_len)
    print(tr)
    if args.save:
        tr.save(args.save)
        print(f"\nsaved {len(tr)} arrays to {args.save}")
    return 0 if tr.max_mismatch <= 1e-9 else 1
