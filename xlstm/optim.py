"""SGD, Adam/AdamW, global-norm gradient clipping and a learning-rate schedule.

Optimisers read ``module.params`` / ``module.grads`` at every step (so they keep working after
``module.to(...)`` replaced the arrays) and update the parameters in place. Their state
(momentum, moments) is keyed by parameter name, allocated once, and follows the parameters
to another backend when they move. The update rules are PyTorch's, so a run can be checked
against torch.optim step by step.
"""
from __future__ import annotations

import math

import numpy as np

from . import backends, flat
from .backends.scratch import Scratch
from .errors import InputError
from .ops import adam


def _source(module_or_params_grads):
    """A function returning (params, grads) dicts: a module's current ones, or a fixed pair."""
    m = module_or_params_grads
    if hasattr(m, "params") and hasattr(m, "grads"):
        return lambda: (m.params, m.grads)
    if isinstance(m, (tuple, list)) and len(m) == 2 and all(isinstance(d, dict) for d in m):
        params, grads = m
        return lambda: (params, grads)
    raise InputError("module_or_params_grads must be a module (with .params and .grads) or a "
                     f"(params, grads) pair of dicts, got {type(m).__name__}")


def _check_float(value, name: str, lo: float, hi: float = math.inf, lo_open=False, hi_open=True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok or math.isnan(v):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise InputError(f"{name} must lie in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


def _to_numpy(a):
    return backends.backend_of(a).to_numpy(a, copy=True)


class Optimizer:
    """Shared machinery: parameter source, per-name state, scratch buffers, (de)serialisation."""

    _hyper: tuple = ("lr",)     # hyperparameters saved in state_dict
    _buffers: tuple = ()        # per-parameter state buffers, by name

    def __init__(self, module_or_params_grads, lr):
        self._get = _source(module_or_params_grads)
        self.lr = _check_float(lr, "lr", 0.0)
        self.step_count = 0
        self.state: dict = {}      # param name -> {buffer name -> array}
        self._scratch: dict = {}   # array type -> Scratch of its backend, shared by same-shaped params

    def _pairs(self):
        """(name, param, grad) for every parameter, checked."""
        params, grads = self._get()
        for k, p in params.items():
            g = grads.get(k)
            if g is None:
                raise InputError(f"parameter {k!r} has no gradient in grads")
            if g.shape != p.shape:
                raise InputError(f"gradient of {k!r} has shape {tuple(g.shape)}, parameter {tuple(p.shape)}")
            yield k, p, g

    def _tmp(self, p, slot: int = 0):
        """A scratch array like ``p``, reused across parameters and steps (no per-step allocation)."""
        cache = self._scratch.get(type(p))
        if cache is None:
            cache = self._scratch[type(p)] = Scratch(backends.backend_of(p).xp, limit=1 << 30)
        return cache.get(slot, p.shape, p.dtype.str)

    def _buffer(self, name: str, which: str, p):
        """State buffer ``which`` of parameter ``name`` (zeros when new), on ``p``'s backend."""
        st = self.state.setdefault(name, {})
        buf = st.get(which)
        if buf is None:
            buf = st[which] = backends.backend_of(p).xp.zeros_like(p)
        elif type(buf) is not type(p):   # the parameters moved (module.to): the state follows once
            buf = st[which] = backends.backend_of(p).asarray(backends.backend_of(buf).to_numpy(buf))
        return buf

    def zero_grad(self) -> None:
        """Set every gradient to zero, in place (one fill of the flat buffer where they are views of one)."""
        grads = list(self._get()[1].values())
        if grads:
            for g in flat.buffer_or(grads):
                g[...] = 0

    def step(self) -> None:
        self.step_count += 1
        for name, p, g in self._pairs():
            self._update(name, p, g)

    def _update(self, name, p, g):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """{'step': int, 'hyper': {name: value}, 'state': {param: {buffer: NumPy array}}} (copies)."""
        return {"step": self.step_count,
                "hyper": {h: getattr(self, h) for h in self._hyper},
                "state": {k: {b: _to_numpy(a) for b, a in st.items()} for k, st in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned; buffers move to the parameters' backend on the next step."""
        if not isinstance(state, dict) or not {"step", "hyper", "state"} <= set(state):
            raise InputError("state must be a dict from Optimizer.state_dict() with keys 'step', 'hyper', 'state'")
        params = self._get()[0]
        unknown = set(state["state"]) - set(params)
        if unknown:
            raise InputError(f"state has buffers for unknown parameters {sorted(unknown)}")
        new = {}
        for k, st in state["state"].items():
            bad = set(st) - set(self._buffers)
            if bad:
                raise InputError(f"state[{k!r}] has unknown buffers {sorted(bad)}; expected {self._buffers}")
            new[k] = {}
            for b, a in st.items():
                a = np.asarray(a) if isinstance(a, np.ndarray) else _to_numpy(a)
                if a.shape != params[k].shape:
                    raise InputError(f"state[{k!r}][{b!r}] has shape {a.shape}, parameter {tuple(params[k].shape)}")
                new[k][b] = backends.backend_of(params[k]).asarray(a.astype(params[k].dtype, copy=True))
        for h, v in state["hyper"].items():
            if h not in self._hyper:
                raise InputError(f"state['hyper'] has unknown hyperparameter {h!r}")
            setattr(self, h, v)
        self.step_count = int(state["step"])
        self.state = new


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as torch.optim.SGD (dampening 0).

        d = g + wd * p
        buf = momentum * buf + d   (buf starts at 0, so buf = d on step 1)   [momentum > 0]
        d = d + momentum * buf (nesterov)  or  d = buf
        p -= lr * d
    """

    _hyper = ("lr", "momentum", "weight_decay", "nesterov")
    _buffers = ("momentum_buffer",)

    def __init__(self, module_or_params_grads, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(module_or_params_grads, lr)
        self.momentum = _check_float(momentum, "momentum", 0.0, 1.0)
        self.weight_decay = _check_float(weight_decay, "weight_decay", 0.0)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise InputError("nesterov=True needs momentum > 0")

    def _update(self, name, p, g):
        xp = backends.backend_of(p).xp
        d = self._tmp(p)
        if self.weight_decay:
            xp.multiply(p, self.weight_decay, out=d)
            d += g
        else:
            d[...] = g
        if self.momentum:
            buf = self._buffer(name, "momentum_buffer", p)   # zeros at first, so step 1 gives buf = d
            buf *= self.momentum
            buf += d
            if self.nesterov:
                # p -= lr * (d + momentum * buf), as two in-place subtractions through d
                d *= self.lr
                p -= d
                xp.multiply(buf, self.lr * self.momentum, out=d)
                p -= d
                return
            d[...] = buf
        d *= self.lr
        p -= d


class Adam(Optimizer):
    """Adam (decoupled=False) or AdamW (decoupled=True), as torch.optim.Adam / AdamW.

        t += 1
        p *= 1 - lr * wd                     [decoupled]      g = g + wd * p   [not decoupled]
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g^2
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    _hyper = ("lr", "betas", "eps", "weight_decay", "decoupled")
    _buffers = ("exp_avg", "exp_avg_sq")

    def __init__(self, module_or_params_grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, decoupled=True):
        super().__init__(module_or_params_grads, lr)
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise InputError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        self.betas = (_check_float(b1, "betas[0]", 0.0, 1.0), _check_float(b2, "betas[1]", 0.0, 1.0))
        self.eps = _check_float(eps, "eps", 0.0, lo_open=True)
        self.weight_decay = _check_float(weight_decay, "weight_decay", 0.0)
        self.decoupled = bool(decoupled)

    def step(self) -> None:
        """One update of every parameter: over the flat gradient buffer where there is one."""
        self.step_count += 1
        pairs = list(self._pairs())
        if not self._flat_step(pairs):
            for name, p, g in pairs:
                self._update(name, p, g)

    def _flat_step(self, pairs) -> bool:
        """The update as one pass of each operation over flat buffers; False where it cannot.

        Needs the gradients to be the declared views of one flat buffer (``xlstm.flat``, e.g.
        ``FlatGrads``) and no coupled weight decay (that stays on the per-tensor path). The moments
        become views of flat buffers too (``state`` keeps per-name views of them). Where the
        parameters are one flat buffer as well (``FlatParams``) the whole update is the backend's
        ``adam_step`` op (``xlstm.ops.adam``: one kernel launch on CuPy, its passes on NumPy).
        Every operation is elementwise and in ``adam.moments``' order, so each element gets the
        very operations of the per-tensor update: the results are equal bit for bit.
        """
        if not pairs or (self.weight_decay and not self.decoupled):
            return False
        grads = [g for _, _, g in pairs]
        backend = backends.backend_of(grads[0])
        G = flat.buffer_of(grads)
        if G is None:
            return False
        names = [k for k, _, _ in pairs]
        M, V = self._flat_moments(names, pairs, G)
        P = flat.buffer_of([p for _, p, _ in pairs])
        whole = P is not None and P.size == G.size and P.dtype == G.dtype      # parameters flat too
        decay = 1.0 - self.lr * self.weight_decay
        if whole:
            backend.adam_step(P, G, M, V, decay if self.weight_decay else 1.0, *self._coefficients())
            return True
        if self.weight_decay:
            for _, p, _ in pairs:
                p *= decay
        d = self._moments(backend.xp, M, V, G)
        off = 0
        for _, p, _ in pairs:
            p -= d[off:off + p.size].reshape(p.shape)
            off += p.size
        return True

    def _flat_moments(self, names, pairs, G):
        """Flat exp_avg / exp_avg_sq buffers like G; made (from the per-name state) when the
        state is not their views (first step, load_state_dict, a move to another backend)."""
        flat = getattr(self, "_flat", None)
        if flat is not None and flat[0] == names and type(flat[1]) is type(G) and all(
                self.state.get(k, {}).get("exp_avg") is mv and self.state[k].get("exp_avg_sq") is vv
                for k, mv, vv in zip(names, flat[3], flat[4])):
            return flat[1], flat[2]
        xp = backends.backend_of(G).xp
        M, V = xp.empty_like(G), xp.empty_like(G)       # 1-D, as G
        mviews, vviews, off = [], [], 0
        for name, p, _ in pairs:
            old_m, old_v = self._buffer(name, "exp_avg", p), self._buffer(name, "exp_avg_sq", p)
            mv, vv = M[off:off + p.size].reshape(p.shape), V[off:off + p.size].reshape(p.shape)
            mv[...], vv[...] = old_m, old_v
            self.state[name] = {"exp_avg": mv, "exp_avg_sq": vv}
            mviews.append(mv)
            vviews.append(vv)
            off += p.size
        self._flat = (names, M, V, mviews, vviews)
        return M, V

    def _update(self, name, p, g):
        xp = backends.backend_of(p).xp
        m = self._buffer(name, "exp_avg", p)
        v = self._buffer(name, "exp_avg_sq", p)
        if self.weight_decay and self.decoupled:
            p *= 1.0 - self.lr * self.weight_decay
        elif self.weight_decay:
            gd = self._tmp(p, 1)                 # g + wd * p, without touching the caller's grads
            xp.multiply(p, self.weight_decay, out=gd)
            gd += g
            g = gd
        p -= self._moments(xp, m, v, g)

    def _coefficients(self):
        """(b1, c1, b2, c2, bc2, eps, step) of ``xlstm.ops.adam`` at the current step."""
        b1, b2 = self.betas
        t = self.step_count
        return (b1, 1.0 - b1, b2, 1.0 - b2, math.sqrt(1.0 - b2 ** t), self.eps, self.lr / (1.0 - b1 ** t))

    def _moments(self, xp, m, v, g):
        """m, v updated in place; returns the step d (a scratch array like g) with p -= d."""
        return adam.moments(xp, m, v, g, self._tmp(g, 0), *self._coefficients())


def _grads_of(grads_dict_or_module):
    g = grads_dict_or_module
    if hasattr(g, "grads") and not isinstance(g, dict):
        g = g.grads
    if isinstance(g, dict):
        return list(g.values())
    if isinstance(g, (list, tuple)):
        return list(g)
    raise InputError(f"grads_dict_or_module must be a dict of gradients, a list of them or a module, "
                     f"got {type(grads_dict_or_module).__name__}")


def clip_grad_norm(grads_dict_or_module, max_norm, on_device: bool = False):
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    total = sqrt(sum over arrays of sum(g^2)); if total > max_norm: g *= max_norm / total.
    Returns ``total`` (before clipping). A non-finite total leaves the gradients unchanged
    (so the caller can see it and skip the step). Unlike torch there is no +1e-6 in the
    denominator, so the clipped norm is max_norm exactly (up to rounding).

    on_device: nothing is read back: the total stays a 0-d float64 array of the gradients'
    backend (returned), and every gradient is multiplied by
    scale = max_norm / total where finite(total) and total > max_norm, else 1,
    rounded to the gradients' dtype first, as the host path rounds its Python float; a
    multiplication by 1 changes no bit, so both paths give the same gradients bit for bit.
    Where the gradients are the declared views of one flat buffer (``xlstm.flat``) and the backend
    implements ``clip_by_global_norm`` (CuPy, ``xlstm.ops.clip``) it is that op instead: two kernel
    launches, the sum of squares in float64 in a fixed order, so there the norm differs from
    NumPy's float32 partial sums in the last bits.
    """
    max_norm = _check_float(max_norm, "max_norm", 0.0, lo_open=True)
    grads = _grads_of(grads_dict_or_module)
    if not grads:
        return 0.0
    backend = backends.backend_of(grads[0])
    xp = backend.xp
    buf = flat.buffer_of(grads)
    if on_device and buf is not None and backend.implements("clip_by_global_norm"):
        return backend.clip_by_global_norm(buf, max_norm)
    # per-array partial sums, added in the model's order (a flat-buffer sum would round differently)
    sq = sum(xp.vdot(g.reshape(-1), g.reshape(-1)) for g in grads)
    if on_device:
        total = xp.sqrt(xp.asarray(sq, dtype=np.float64))       # float64 sqrt, as math.sqrt
        clip = xp.isfinite(total) & (total > max_norm)
        scale = xp.where(clip, max_norm / xp.where(clip, total, 1.0), 1.0)
        for g in [buf] if buf is not None else grads:
            g *= scale.astype(g.dtype)
        return total
    total = math.sqrt(float(sq))
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / total
        for g in grads:
            g *= scale
    return total


def lr_schedule(step: int, base_lr: float, warmup: int, total: int, kind: str = "cosine",
                min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine decay or constant.

    step < warmup:  base_lr * (step + 1) / warmup   (the first step already learns)
    cosine:         min_lr + (base_lr - min_lr) * (1 + cos(pi * q)) / 2,
                    q = (step - warmup) / (total - warmup), clipped to [0, 1]
    constant:       base_lr
    """
    if kind not in ("cosine", "constant"):
        raise InputError(f"kind must be 'cosine' or 'constant', got {kind!r}")
    for v, n in ((step, "step"), (warmup, "warmup"), (total, "total")):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise InputError(f"{n} must be a non-negative integer, got {v!r}")
    base_lr = _check_float(base_lr, "base_lr", 0.0)
    min_lr = _check_float(min_lr, "min_lr", 0.0, base_lr, hi_open=False)
    if kind == "cosine" and total <= warmup:
        raise InputError(f"total ({total}) must exceed warmup ({warmup}) for the cosine schedule")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "constant":
        return base_lr
    q = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * q))
