"""Weights to and from PyTorch ``nn.LSTM`` and TensorFlow LSTM cells.

PyTorch (gate order i, f, g, o, like ours): ``weight_ih_l{k}`` [4H,D] = W^T,
``weight_hh_l{k}`` [4H,H] = U^T, ``bias_ih_l{k}`` + ``bias_hh_l{k}`` = b; reverse direction
suffixed ``_reverse``. PyTorch has no forget bias constant, so ``from_torch`` sets 0.

TensorFlow (BasicLSTMCell / LSTMCell / LayerNormBasicLSTMCell): one kernel [D+H,4H] applied to
concat([x, h]), columns in gate order i, j, f, o (j = our g), bias [4H], forget_bias added.
"""
from __future__ import annotations

import numpy as np

from .checks import host_numpy as _np
from .errors import InputError
from .gates import TF_TO_OURS
from .layernorm import tf_layer_norm_params
from .lstm import LSTM


def _torch_name(k: int, d: int) -> str:
    return f"l{k}{'_reverse' if d else ''}"


def from_torch(torch_lstm, dtype=None, backend=None) -> LSTM:
    """An xlstm.LSTM with the weights of a ``torch.nn.LSTM`` (forget_bias=0).

    Supports any num_layers and bidirectional; the torch module must be time-major
    (batch_first=False is how xlstm takes x; with batch_first=True transpose your data) and
    have no projection (proj_size=0). dtype defaults to the torch module's.
    """
    m = torch_lstm
    if getattr(m, "proj_size", 0):
        raise InputError("from_torch: LSTMs with proj_size > 0 are not supported")
    if getattr(m, "bias", True) is False:
        raise InputError("from_torch: torch LSTM built with bias=False is not supported")
    sd = {k: _np(v) for k, v in m.state_dict().items()}
    if dtype is None:
        dtype = sd["weight_ih_l0"].dtype.name
    lstm = LSTM(m.input_size, m.hidden_size, num_layers=m.num_layers, bidirectional=m.bidirectional,
                forget_bias=0.0, dtype=dtype, backend=backend)
    state = {}
    for k in range(lstm.num_layers):
        for d in range(lstm.num_directions):
            t, p = _torch_name(k, d), lstm.prefix(k, d)
            state[p + "W"] = sd[f"weight_ih_{t}"].T
            state[p + "U"] = sd[f"weight_hh_{t}"].T
            state[p + "b"] = sd[f"bias_ih_{t}"] + sd[f"bias_hh_{t}"]
    lstm.load_state_dict(state)
    return lstm


def to_torch_state_dict(lstm: LSTM, grads: bool = False) -> dict:
    """NumPy arrays under torch.nn.LSTM's names (``load_state_dict`` them after torch.from_numpy).

    grads=True gives the gradients torch would compute: the bias gradient appears under both
    ``bias_ih`` and ``bias_hh`` since b = bias_ih + bias_hh. The forget bias constant, which
    torch lacks, goes into the forget block of ``bias_hh`` so torch computes the same function.
    """
    if lstm.layer_norm:
        raise InputError("to_torch_state_dict: torch.nn.LSTM has no layer norm; this model has layer_norm=True")
    src = lstm.grads if grads else lstm.params
    be = lstm.backend
    out = {}
    for k in range(lstm.num_layers):
        for d in range(lstm.num_directions):
            t, p = _torch_name(k, d), lstm.prefix(k, d)
            b = be.to_numpy(src[p + "b"], copy=True)
            # copies: ascontiguousarray(W.T) is a view of W when D or H is 1
            out[f"weight_ih_{t}"] = np.array(be.to_numpy(src[p + "W"]).T, order="C")
            out[f"weight_hh_{t}"] = np.array(be.to_numpy(src[p + "U"]).T, order="C")
            out[f"bias_ih_{t}"] = b
            if grads:
                out[f"bias_hh_{t}"] = b.copy()
            else:
                out[f"bias_hh_{t}"] = np.zeros_like(b)
                out[f"bias_hh_{t}"][lstm.hidden_size:2 * lstm.hidden_size] = lstm.forget_bias
    return out


def _tf_kernel_to_ours(kernel, bias, D, H):
    """Split a TF kernel [D+H,4H] (columns i, j, f, o) into W [D,4H], U [H,4H], b [4H] (i, f, g, o)."""
    kernel = _np(kernel)
    if kernel.shape != (D + H, 4 * H):
        raise InputError(f"from_tf: kernel has shape {kernel.shape}, expected ({D + H}, {4 * H}) [D+H,4H]")
    cols = np.concatenate([np.arange(H) + H * TF_TO_OURS[g] for g in range(4)])
    W, U = kernel[:D][:, cols], kernel[D:][:, cols]
    b = None
    if bias is not None:
        bias = _np(bias)
        if bias.shape != (4 * H,):
            raise InputError(f"from_tf: bias has shape {bias.shape}, expected ({4 * H},) [4H]")
        b = bias[cols]
    return W, U, b


def _per_layer(name, values, n, who):
    """``values`` as a list of n per-layer entries (None -> n Nones); else InputError."""
    if values is None:
        return [None] * n
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{type(values).__name__} of length {len(values)}" if hasattr(values, "__len__") else repr(values)
        raise InputError(f"{who}: {name} must be a list with one entry per layer ({n}), got {got}")
    return list(values)


def _from_tf_cells(cells, forget_bias, layer_norm, dtype, backend, who) -> LSTM:
    """The LSTM for TensorFlow cells: cells[k][d] = (kernel, bias, layer_norm_dict) per layer k, direction d.

    Layer k > 0 reads the previous layer's output, [dirs*H] wide (TensorFlow's stacked and
    stack_bidirectional_dynamic_rnn layouts).
    """
    k0 = _np(cells[0][0][0])
    if k0.ndim != 2 or k0.shape[1] % 4:
        raise InputError(f"{who}: kernel has shape {k0.shape}, expected [D+H, 4H]")
    H = k0.shape[1] // 4
    D = k0.shape[0] - H
    if dtype is None:
        dtype = k0.dtype.name if k0.dtype.name in ("float32", "float64") else "float32"
    dirs = len(cells[0])
    lstm = LSTM(D, H, num_layers=len(cells), bidirectional=dirs == 2, forget_bias=forget_bias,
                layer_norm=layer_norm, dtype=dtype, backend=backend)
    state = {}
    for k, layer in enumerate(cells):
        for d, (kern, bias, ln) in enumerate(layer):
            W, U, b = _tf_kernel_to_ours(kern, None if layer_norm else bias, D if k == 0 else dirs * H, H)
            p = lstm.prefix(k, d)
            state[p + "W"], state[p + "U"] = W, U
            if layer_norm:
                state.update(tf_layer_norm_params(ln, H, p))
            elif b is None:
                raise InputError(f"{who}: a bias is required for each cell when layer_norm is None")
            else:
                state[p + "b"] = b
    lstm.load_state_dict(state)
    return lstm


def from_tf(kernels, biases, forget_bias: float = 1.0, layer_norm=None, dtype=None, backend=None) -> LSTM:
    """An xlstm.LSTM from TensorFlow cell variables, one (kernel, bias) per stacked layer.

    kernels: list of [D_k+H, 4H] arrays (a single array means one layer); biases: list of [4H]
    (or None entries for LayerNorm cells, which have no bias). layer_norm: None, or a list (one
    per layer) of dicts with TensorFlow's LayerNormBasicLSTMCell names ``input``,
    ``transform``, ``forget``, ``output``, ``state``, each a (gamma, beta) pair of [H] arrays.
    """
    if not isinstance(kernels, (list, tuple)):
        kernels, biases = [kernels], [biases]
    n = len(kernels)
    biases = _per_layer("biases", biases, n, "from_tf")
    lns = _per_layer("layer_norm", layer_norm, n, "from_tf")
    cells = [[(kernels[k], biases[k], lns[k])] for k in range(n)]
    return _from_tf_cells(cells, forget_bias, layer_norm is not None, dtype, backend, "from_tf")


def from_tf_bidirectional(kernels_fw, kernels_bw, biases_fw=None, biases_bw=None, forget_bias: float = 1.0,
                          layer_norm=None, layer_norm_bw=None, dtype=None, backend=None) -> LSTM:
    """A bidirectional xlstm.LSTM from TensorFlow forward and backward cells, one pair per layer.

    As ``tf.compat.v1.nn.stack_bidirectional_dynamic_rnn(cells_fw, cells_bw)``: layer k>0 reads
    concat([fw output, bw output]), so its kernels are [2H+H, 4H]. kernels_fw / kernels_bw: lists
    of [D_k+H, 4H]; biases_fw / biases_bw: lists of [4H] (None for LayerNorm cells);
    layer_norm / layer_norm_bw: None, or per-layer dicts as in ``from_tf`` (fw and bw cells).
    """
    who = "from_tf_bidirectional"
    if not isinstance(kernels_fw, (list, tuple)):
        kernels_fw, kernels_bw = [kernels_fw], [kernels_bw]
        biases_fw = None if biases_fw is None else [biases_fw]
        biases_bw = None if biases_bw is None else [biases_bw]
    ln = layer_norm is not None
    if ln != (layer_norm_bw is not None):
        raise InputError(f"{who}: give layer_norm and layer_norm_bw together (or neither)")
    n = len(kernels_fw)
    per_dir = []
    for sfx, kern, bias, lnd in (("fw", kernels_fw, biases_fw, layer_norm), ("bw", kernels_bw, biases_bw, layer_norm_bw)):
        if bias is None and not ln:
            raise InputError(f"{who}: biases_{sfx} is required when layer_norm is None")
        per_dir.append((_per_layer(f"kernels_{sfx} ({'forward' if sfx == 'fw' else 'backward'} kernels)", kern, n, who), _per_layer(f"biases_{sfx}", bias, n, who),
                        _per_layer("layer_norm" + ("_bw" if sfx == "bw" else ""), lnd, n, who)))
    cells = [[(K[k], B[k], L[k]) for K, B, L in per_dir] for k in range(n)]
    return _from_tf_cells(cells, forget_bias, ln, dtype, backend, who)
