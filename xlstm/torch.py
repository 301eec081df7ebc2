"""xlstm inside PyTorch: ``xlstm.torch.LSTM``, a ``torch.nn.Module`` whose gradient is xlstm's BPTT.

    import xlstm.torch
    lstm = xlstm.torch.LSTM(D, H, num_layers=2, layer_norm=True, zoneout=0.1, batch_first=True)
    output, (h_n, c_n) = lstm(x, hx=None)     # x [B,T,D] here; [T,B,D] without batch_first

Arguments, shapes and results are ``torch.nn.LSTM``'s: output [T,B,dirs*H] (batch_first:
[B,T,dirs*H]), h_n/c_n [layers*dirs,B,H]; an unbatched [T,D] input; a ``PackedSequence`` in gives
one out; ``dropout`` acts on the outputs of every layer but the last, in training. Added:
``layer_norm`` (TensorFlow's LayerNormBasicLSTMCell), ``forget_bias`` (a constant on the forget
pre-activation; 0 computes nn.LSTM's function), ``recurrent_dropout`` (drops the candidate g)
and ``zoneout`` (a unit of h and c keeps its previous value; evaluation uses the expectation).

Parameters of layer k (suffix ``_reverse`` for the reverse direction), gates blocked i, f, g, o:
    weight_ih_l{k} [4H,D_k] = W^T      weight_hh_l{k} [4H,H] = U^T       (nn.LSTM's layout)
    plain cell:     bias_ih_l{k}, bias_hh_l{k} [4H]. xlstm's one bias is b = bias_ih + bias_hh,
                    so both receive the gradient db = sum over t, b of dz (as in torch).
    LayerNorm cell: ln_gain_l{k}, ln_shift_l{k} [4H] (each gate's norm, blocked i, f, g, o),
                    ln_c_gain_l{k}, ln_c_shift_l{k} [H] (the cell state's norm). No bias_*: the
                    shifts are the cell's biases, as in TensorFlow.
So ``load_state_dict`` of a ``torch.nn.LSTM``'s state dict works for the plain cell.

Gradient: one ``torch.autograd.Function`` per call runs ``xlstm.LSTM.forward`` and ``.backward``
(one xlstm.LSTM per layer, with the inter-layer dropout between them) on the backend of the
tensors' device. CPU: NumPy arrays that share memory with the tensors (input, output, states,
dy, dx and the weight gradients are never copied; W and U are transposed views of the weights,
which measured faster than contiguous copies; b = bias_ih + bias_hh [4H] is summed per call and
bias_hh's gradient is a copy of db). CUDA: CuPy views through DLPack, every kernel queued on
torch's current stream; the input checks' device flags are left unread, so nothing waits on the
device; W and U are copied to contiguous [D,4H], [H,4H] once per call, as the fused kernels need. Masks are drawn from torch's RNG before
the call (``torch.manual_seed`` reproduces a run) and the backward uses the forward's. Double
backward is refused. The activations are freed by the backward (as torch frees saved tensors);
a second backward through one graph (retain_graph=True) reruns the forward with the same masks.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends
from .errors import InputError
from .lstm import LSTM as _Core

__all__ = ["LSTM"]

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


# -- devices: torch tensors <-> the backend's arrays, sharing memory ---------------------------
class _Host:
    """CPU tensors as NumPy arrays viewing the same memory."""

    backend = "numpy"

    def __init__(self, device):
        self.device = device

    def context(self):
        return contextlib.nullcontext()

    @staticmethod
    def to_xp(t):
        return t.detach().numpy()

    @staticmethod
    def from_xp(a):
        return torch.from_numpy(a)

    @staticmethod
    def weight(w):
        """W [D,4H] for nn.LSTM's weight [4H,D]: a transposed view."""
        return w.detach().numpy().T

    @staticmethod
    def zeros(shape, like):
        """A zeroed tensor of ``like``'s dtype; NumPy's calloc'd pages, so no torch kernel (whose
        spinning OpenMP threads would slow the BLAS calls that follow)."""
        return torch.from_numpy(np.zeros(shape, _NUMPY[like.dtype]))

    def weight_grad(self, w):
        """(gradient tensor shaped like w, the [D,4H] view of it that xlstm accumulates into)."""
        g = self.zeros(w.shape, w)
        return g, g.numpy().T


class _Cuda:
    """CUDA tensors as CuPy arrays (DLPack), on torch's current stream of the tensors' device."""

    backend = "cupy"

    def __init__(self, device):
        reason = backends.cupy_unavailable_reason()
        if reason is not None:
            raise InputError(
                f"xlstm.torch.LSTM got CUDA tensors, but xlstm's CUDA backend (CuPy) cannot run here: {reason}. "
                "Install CuPy for torch's CUDA version: pip install 'xlstm-bptt[cuda12]' (CUDA 12) or "
                "'xlstm-bptt[cuda13]' (CUDA 13); or move the module and the data to the CPU with .cpu()")
        from .backends import dlpack

        self._dlpack = dlpack
        self.device = device

    def context(self):
        return self._dlpack.on_stream(torch.cuda.current_stream(self.device), self.device.index)

    def to_xp(self, t):
        return self._dlpack.from_dlpack(t.detach())

    @staticmethod
    def from_xp(a):
        return torch.utils.dlpack.from_dlpack(a)

    def weight(self, w):
        return self.to_xp(w.detach().t().contiguous())

    @staticmethod
    def zeros(shape, like):
        return like.new_zeros(shape)

    def weight_grad(self, w):
        g = self.zeros((w.shape[1], w.shape[0]), w)
        return g.t(), self.to_xp(g)


def _bridge(device):
    if device.type == "cpu":
        return _Host(device)
    if device.type == "cuda":
        return _Cuda(device)
    raise InputError(f"xlstm.torch.LSTM runs on CPU and CUDA tensors, got device {device}; "
                     "move the module and the data with .cpu() or .cuda()")


# -- one call: the cores, masks and lengths shared by forward and backward ----------------------
class _Pool:
    """Idle per-layer xlstm.LSTM stacks by (device, dtype): building one draws its (unused)
    initial weights, so a stack is reused once its call is done."""

    def __init__(self):
        self.free: dict = {}

    def take(self, m, bridge, dtype):
        # everything a core is built with: a module attribute changed between calls (forget_bias,
        # say) gets new cores, never stale ones
        key = (bridge.backend, str(bridge.device), dtype, m.input_size, m.hidden_size, m.num_layers,
               m.bidirectional, m.layer_norm, m.forget_bias)
        idle = self.free.get(key)
        if idle:
            return key, idle.pop()
        dirs = 2 if m.bidirectional else 1
        stack = [_Core(m.input_size if k == 0 else m.hidden_size * dirs, m.hidden_size, num_layers=1,
                       bidirectional=m.bidirectional, layer_norm=m.layer_norm, forget_bias=m.forget_bias,
                       dtype=dtype, seed=0, backend=bridge.backend) for k in range(m.num_layers)]
        return key, stack

    def give(self, key, stack):
        self.free.setdefault(key, []).append(stack)


class _Call:
    """What one forward needs and its backward reuses: the device bridge, a stack of cores (one
    xlstm.LSTM per layer) bound to the weights, lengths, cell masks and inter-layer dropout masks."""

    def __init__(self, m, bridge, dtype, lengths, masks, drops):
        self.m, self.bridge, self.lengths = m, bridge, lengths
        self.masks, self.drops = masks, drops
        self.pool, self.dtype = m._pool, dtype
        self.key = self.stack = None

    def __del__(self):                      # a call dropped without backward still returns its stack
        self.release()

    def release(self):
        """Free the activations and hand the stack back for the next call."""
        if self.stack is not None:
            for core in self.stack:
                core.release_cache()
            self.pool.give(self.key, self.stack)
            self.stack = None

    def _groups(self, weights):
        """weights split per (layer, direction)."""
        n = len(weights) // (self.m.num_layers * self.m._dirs)
        return [weights[i:i + n] for i in range(0, len(weights), n)]

    def _bind(self, core, d, w):
        """Point the core's parameters at direction d's weights ``w`` (see the module docstring)."""
        br, p = self.bridge, core.prefix(0, d)
        core.params[p + "W"], core.params[p + "U"] = br.weight(w[0]), br.weight(w[1])
        if self.m.layer_norm:
            for name, t in zip(("ln_gain", "ln_shift", "ln_c_gain", "ln_c_shift"), w[2:]):
                core.params[p + name] = br.to_xp(t)
        elif self.m.bias:
            core.params[p + "b"] = br.to_xp(w[2].detach() + w[3].detach())
        else:
            core.params[p + "b"] = br.to_xp(br.zeros(w[0].shape[0], w[0]))

    def _fresh_grads(self, core, d, w):
        """Zeroed gradient tensors for direction d's weights ``w``, which the core accumulates into."""
        br, p = self.bridge, core.prefix(0, d)
        out = []
        for name, t in (("W", w[0]), ("U", w[1])):
            g, core.grads[p + name] = br.weight_grad(t)
            out.append(g)
        if self.m.layer_norm:
            for name, t in zip(("ln_gain", "ln_shift", "ln_c_gain", "ln_c_shift"), w[2:]):
                g = br.zeros(t.shape, t)
                core.grads[p + name] = br.to_xp(g)
                out.append(g)
        else:
            g = br.zeros(w[0].shape[0], w[0])
            core.grads[p + "b"] = br.to_xp(g)
            if self.m.bias:
                out += [g, g]                  # b = bias_ih + bias_hh: both get db (cloned once filled)
        return out

    def _on_device(self):
        """The bridge's device context; on CuPy the input checks' flags are left unread, so the
        call never waits on the device."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.bridge.context())
        if self.bridge.backend == "cupy":
            reads = stack.enter_context(backends.resolve("cupy").deferred())
            stack.callback(reads.drop)         # runs first on exit: nothing queued is read
        return stack

    def forward(self, x, h0, c0, weights):
        br, dirs = self.bridge, self.m._dirs
        groups = self._groups(weights)
        with self._on_device():
            self.key, self.stack = self.pool.take(self.m, br, self.dtype)
            inp = br.to_xp(x)
            h0x = None if h0 is None else br.to_xp(h0)
            c0x = None if c0 is None else br.to_xp(c0)
            hs, cs = [], []
            for k, core in enumerate(self.stack):
                for d in range(dirs):
                    self._bind(core, d, groups[k * dirs + d])
                s = slice(k * dirs, (k + 1) * dirs)
                state = None if h0x is None else (h0x[s], c0x[s])
                y, (hn, cn) = core.forward(inp, state, lengths=self.lengths, masks=self.masks[k])
                hs.append(br.from_xp(hn))
                cs.append(br.from_xp(cn))
                inp = y if self.drops[k] is None else y * self.drops[k]
            out = br.from_xp(y)
        if len(hs) == 1:
            return out, hs[0], cs[0]
        return out, torch.cat(hs), torch.cat(cs)

    def backward(self, dy, dhn, dcn, x, h0, c0, weights):
        """BPTT of the forward; a second backward (retain_graph) first reruns it with the same masks."""
        br, dirs, L = self.bridge, self.m._dirs, self.m.num_layers
        if self.stack is None:
            self.forward(x, h0, c0, weights)
        groups = self._groups(weights)
        grads = [None] * len(groups)
        dh0, dc0 = [None] * L, [None] * L
        with self._on_device():
            d = br.to_xp(dy.contiguous())
            dhx, dcx = br.to_xp(dhn.contiguous()), br.to_xp(dcn.contiguous())
            for k in reversed(range(L)):
                core = self.stack[k]
                for j in range(dirs):
                    grads[k * dirs + j] = self._fresh_grads(core, j, groups[k * dirs + j])
                s = slice(k * dirs, (k + 1) * dirs)
                dx, (dh, dc) = core.backward(d, (dhx[s], dcx[s]))
                if k > 0 and self.drops[k - 1] is not None:
                    dx *= self.drops[k - 1]
                dh0[k], dc0[k] = br.from_xp(dh), br.from_xp(dc)
                d = dx
                core.grads.clear()              # so autograd may take the gradient tensors without copying
            dx = br.from_xp(d)
        self.release()
        flat = [g.clone() if i and g is group[i - 1] else g for group in grads for i, g in enumerate(group)]
        if h0 is None:
            return dx, None, None, flat
        if L == 1:
            return dx, dh0[0], dc0[0], flat
        return dx, torch.cat(dh0), torch.cat(dc0), flat


class _StackFunction(torch.autograd.Function):
    """y, h_n, c_n = f(x, h0, c0, *weights) for the whole layer stack, backward by xlstm's BPTT."""

    @staticmethod
    def forward(ctx, call, x, h0, c0, *weights):
        y, hn, cn = call.forward(x, h0, c0, weights)
        if any(ctx.needs_input_grad):
            ctx.call = call
            # torch then refuses weights changed in place before backward; x and the state are
            # what a second backward (retain_graph) reruns the forward on
            ctx.save_for_backward(x, h0, c0, *weights)
        else:
            call.release()
        return y, hn, cn

    @staticmethod
    def backward(ctx, dy, dhn, dcn):
        if torch.is_grad_enabled():
            raise RuntimeError("xlstm.torch.LSTM does not support double backward (create_graph=True, "
                               "gradients of gradients): its BPTT is hand-written code, not torch operations; "
                               "use torch.nn.LSTM for higher-order gradients")
        x, h0, c0, *weights = ctx.saved_tensors
        dx, dh0, dc0, dw = ctx.call.backward(dy, dhn, dcn, x, h0, c0, weights)
        return (None, dx, dh0, dc0, *dw)


# -- the module ----------------------------------------------------------------------------
class LSTM(nn.Module):
    """torch.nn.LSTM's interface on xlstm's cells and BPTT (see the module docstring).

    Args (nn.LSTM's): input_size (D), hidden_size (H), num_layers, bias, batch_first, dropout
        (between layers, training only), bidirectional, device, dtype (float32 or float64).
    Added: layer_norm (LayerNorm cell; has no bias_* parameters), forget_bias (constant on the
        forget pre-activation, 0 = nn.LSTM's function), recurrent_dropout (probability of
        dropping the candidate g, training only), zoneout (probability that a unit keeps its
        previous h and c, training; evaluation keeps the expectation).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 layer_norm: bool = False, forget_bias: float = 0.0, recurrent_dropout: float = 0.0,
                 zoneout: float = 0.0, device=None, dtype=None):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        for name, p in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout), ("zoneout", zoneout)):
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise InputError(f"{name} must be a probability in [0, 1), got {p!r}")
        if not math.isfinite(float(forget_bias)):
            raise InputError(f"forget_bias must be a finite number, got {forget_bias!r}")
        if layer_norm and not bias:
            raise InputError("bias=False applies to the plain cell: the LayerNorm cell has no bias_ih/bias_hh "
                             "(its ln_shift parameters are the biases); leave bias=True with layer_norm=True")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.layer_norm = bool(bidirectional), bool(layer_norm)
        self.forget_bias = float(forget_bias)
        self.recurrent_dropout, self.zoneout = float(recurrent_dropout), float(zoneout)
        self._dirs = 2 if bidirectional else 1
        self._pool = _Pool()
        kw = {"device": device, "dtype": dtype}
        H = hidden_size
        self._weight_names = []
        for k in range(num_layers):
            D = input_size if k == 0 else H * self._dirs
            for d in range(self._dirs):
                sfx = f"_l{k}" + ("_reverse" if d else "")
                shapes = [("weight_ih", (4 * H, D)), ("weight_hh", (4 * H, H))]
                if layer_norm:
                    shapes += [("ln_gain", (4 * H,)), ("ln_shift", (4 * H,)), ("ln_c_gain", (H,)), ("ln_c_shift", (H,))]
                elif bias:
                    shapes += [("bias_ih", (4 * H,)), ("bias_hh", (4 * H,))]
                for name, shape in shapes:
                    setattr(self, name + sfx, nn.Parameter(torch.empty(shape, **kw)))
                    self._weight_names.append(name + sfx)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation: U(-1/sqrt(H), 1/sqrt(H)); LayerNorm gains 1, shifts 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name in self._weight_names:
                p = getattr(self, name)
                if name.startswith(("ln_gain", "ln_c_gain")):
                    p.fill_(1.0)
                elif name.startswith(("ln_shift", "ln_c_shift")):
                    p.zero_()
                else:
                    p.uniform_(-bound, bound)

    def flatten_parameters(self) -> None:
        """Nothing to do (nn.LSTM's cuDNN weight packing); here so code written for nn.LSTM runs."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("layer_norm", False), ("forget_bias", 0.0),
                              ("recurrent_dropout", 0.0), ("zoneout", 0.0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"] = _Pool()               # idle cores are a cache, not state (torch.save, deepcopy)
        return state

    # -- forward ------------------------------------------------------------------------------
    def _weights(self):
        ws = [getattr(self, n) for n in self._weight_names]
        dt, dev = ws[0].dtype, ws[0].device
        if dt not in _DTYPES:
            raise InputError(f"xlstm.torch.LSTM computes in float32 or float64; its weights are {dt}: "
                             "call .float() or .double() on the module")
        for n, w in zip(self._weight_names, ws):
            if w.dtype != dt or w.device != dev:
                raise InputError(f"parameter {n} is {w.dtype} on {w.device} but weight_ih_l0 is {dt} on {dev}; "
                                 "move the whole module with .to(...)")
        return ws

    def _check_input(self, x, ws):
        w = ws[0]
        if x.dtype != w.dtype:
            raise InputError(f"input has dtype {x.dtype} but the LSTM's weights are {w.dtype}; convert one "
                             f"(input.to({w.dtype}) or module.to({x.dtype}))")
        if x.device != w.device:
            raise InputError(f"input is on {x.device} but the LSTM's weights are on {w.device}; move one "
                             f"(input.to('{w.device}') or module.to('{x.device}'))")
        if x.shape[-1] != self.input_size:
            raise InputError(f"input has {x.shape[-1]} features (last axis of shape {tuple(x.shape)}) but the "
                             f"LSTM was built with input_size={self.input_size}")

    def _check_state(self, hx, B, ws, batched):
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(t, torch.Tensor) for t in hx):
            raise InputError("hx must be a tuple (h_0, c_0) of tensors, each [num_layers*dirs, B, H]")
        S = (self.num_layers * self._dirs, B, self.hidden_size) if batched else \
            (self.num_layers * self._dirs, self.hidden_size)
        w = ws[0]
        for name, t in zip(("h_0", "c_0"), hx):
            if tuple(t.shape) != S:
                raise InputError(f"{name} has shape {tuple(t.shape)}, expected {S} "
                                 f"[num_layers*dirs, {'B, ' if batched else ''}H]")
            if t.dtype != w.dtype or t.device != w.device:
                raise InputError(f"{name} is {t.dtype} on {t.device} but the LSTM's weights are {w.dtype} on "
                                 f"{w.device}; move it with .to(...)")

    def _draw_masks(self, T, B, like):
        """Per layer: {(0, d): (zc, zh, gmask)} and the dropout mask of its output (or None),
        as torch tensors from torch's RNG (so torch.manual_seed reproduces them)."""
        H, dirs = self.hidden_size, self._dirs
        kw = {"dtype": like.dtype, "device": like.device}
        masks, drops = [], []
        for k in range(self.num_layers):
            layer = {}
            for d in range(dirs):
                zc = zh = gm = None
                if self.zoneout > 0:
                    if self.training:
                        zc = (torch.rand(T, B, H, **kw) < self.zoneout).to(like.dtype)
                        zh = (torch.rand(T, B, H, **kw) < self.zoneout).to(like.dtype)
                    else:
                        zc = zh = torch.full((T, B, H), self.zoneout, **kw)
                if self.recurrent_dropout > 0 and self.training:
                    keep = 1.0 - self.recurrent_dropout
                    gm = (torch.rand(T, B, H, **kw) < keep).to(like.dtype) / keep
                layer[(0, d)] = (zc, zh, gm)
            masks.append(layer)
            drop = None
            if self.dropout > 0 and self.training and k < self.num_layers - 1:
                keep = 1.0 - self.dropout
                drop = (torch.rand(T, B, H * dirs, **kw) < keep).to(like.dtype) / keep
            drops.append(drop)
        return masks, drops

    def forward(self, input, hx=None):
        """input [T,B,D] ([B,T,D] with batch_first), [T,D] unbatched, or a PackedSequence;
        hx (h_0, c_0) each [num_layers*dirs,B,H] or None (zeros).
        Returns output [T,B,dirs*H] (as the input: batch_first, unbatched, packed) and (h_n, c_n)."""
        ws = self._weights()
        packed = isinstance(input, PackedSequence)
        lengths = None
        if packed:
            x, lens = pad_packed_sequence(input)          # [T,B,D], batch in the caller's order
            lengths = lens.numpy()
            batched = True
        elif isinstance(input, torch.Tensor):
            if input.dim() not in (2, 3):
                raise InputError(f"input must be 3-D [T,B,D] ({'[B,T,D] with batch_first' if self.batch_first else 'or [B,T,D] with batch_first=True'}) "
                                 f"or 2-D [T,D] for one unbatched sequence, got shape {tuple(input.shape)}")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if self.batch_first and batched:
                x = x.transpose(0, 1)
        else:
            raise InputError(f"input must be a torch.Tensor or a PackedSequence, got {type(input).__name__}")
        self._check_input(x, ws)
        T, B = x.shape[0], x.shape[1]
        if T == 0 or B == 0:
            raise InputError(f"input has shape {tuple(input.shape) if not packed else tuple(x.shape)}: "
                             "sequence length and batch must be at least 1")
        h0 = c0 = None
        if hx is not None:
            self._check_state(hx, B, ws, batched)
            h0, c0 = (t.contiguous() if batched else t.unsqueeze(1).contiguous() for t in hx)
        x = x.contiguous()                                 # time-major rows for the input GEMM
        masks, drops = self._draw_masks(T, B, x)
        br = _bridge(x.device)
        with br.context():
            to = br.to_xp
            masks_x = [{key: tuple(None if m is None else to(m) for m in ms) for key, ms in layer.items()}
                       for layer in masks]
            drops_x = [None if m is None else to(m) for m in drops]
        call = _Call(self, br, _DTYPES[ws[0].dtype], lengths, masks_x, drops_x)
        y, h_n, c_n = _StackFunction.apply(call, x, h0, c0, *ws)
        if packed:
            y = _repack(y, lens, input)
        elif not batched:
            y, h_n, c_n = y.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            y = y.transpose(0, 1)
        return y, (h_n, c_n)


def _repack(y, lengths, like: PackedSequence) -> PackedSequence:
    """The padded output y [T,B,*] (caller's batch order) packed as ``like`` is."""
    if like.sorted_indices is not None:
        y = y.index_select(1, like.sorted_indices)
        # the lengths in that order are the lengths sorted (ties are equal values), so the
        # indices need not come to the host
        lengths = lengths.sort(descending=True).values
    data = pack_padded_sequence(y, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
