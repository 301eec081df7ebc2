"""Dense, Embedding and Sequential: the layers around an LSTM in a language model.

Each layer keeps what its backward needs from the last forward, and ``backward``
accumulates parameter gradients into ``self.grads`` (so several backward calls before one
optimiser step add up, like truncated BPTT windows).
"""
from __future__ import annotations

import inspect
import math

import numpy as np

from .checks import as_array, check_range
from .errors import InputError, StateError
from .module import Module
from .ops.embedding_scatter import SCATTER_METHODS, scatter_add_rows  # noqa: F401  (public here too)


def _check_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Dense(Module):
    """Affine map of the last axis: ``y = x @ W + b``.

    x [..., in] -> y [..., out];  W [in, out], b [out].
    Backward, with x and dy flattened to [N, in] and [N, out]:
        dW += x^T dy,   db += sum_n dy,   dx = dy W^T.
    precision: "float32" | "tf32" | "bf16", the three products' operand format (as LSTM).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype="float32", seed=None, backend=None, precision="float32"):
        super().__init__(dtype=dtype, backend=backend, precision=precision)
        self.in_features = _check_size(in_features, "in_features")
        self.out_features = _check_size(out_features, "out_features")
        self.bias = bool(bias)
        rng = np.random.default_rng(seed)
        # PyTorch's nn.Linear default: U(-k, k), k = 1/sqrt(in), keeps the output variance ~1/3
        k = 1.0 / math.sqrt(self.in_features)
        self._add_param("W", rng.uniform(-k, k, size=(self.in_features, self.out_features)))
        if self.bias:
            self._add_param("b", rng.uniform(-k, k, size=(self.out_features,)))
        self._x = None

    def forward(self, x):
        """x [..., in] -> y [..., out]."""
        x = as_array(self.backend, x, "x", dtype=self.dtype, dims="[..., in_features]")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise InputError(f"x has shape {tuple(x.shape)}, expected [..., {self.in_features}] "
                             f"(the last axis must be in_features={self.in_features})")
        self._x = x
        if self.precision == "float32":
            y = x @ self.params["W"]
        else:
            y = self.backend.matmul(x.reshape(-1, self.in_features), self.params["W"],
                                    precision=self.precision).reshape(tuple(x.shape[:-1]) + (self.out_features,))
        if self.bias:
            y += self.params["b"]
        return y

    def backward(self, dy):
        """dy [..., out] -> dx [..., in]; adds dW and db into ``self.grads``."""
        if self._x is None:
            raise StateError("Dense.backward called before forward")
        x = self._x
        dy = as_array(self.backend, dy, "dy", dtype=self.dtype,
                      shape=tuple(x.shape[:-1]) + (self.out_features,), dims="[..., out_features]")
        x2 = x.reshape(-1, self.in_features)
        dy2 = dy.reshape(-1, self.out_features)
        if self.precision == "float32":
            self.grads["W"] += x2.T @ dy2
        else:
            self.backend.matmul_add(x2.T, dy2, self.grads["W"], self.precision)
        if self.bias:
            self.grads["b"] += dy2.sum(axis=0)
        if self.precision == "float32":
            return dy @ self.params["W"].T
        return self.backend.matmul(dy2, self.params["W"].T, precision=self.precision).reshape(x.shape)

    def __call__(self, x):
        return self.forward(x)

    def __repr__(self):
        prec = "" if self.precision == "float32" else f", precision='{self.precision}'"
        return f"Dense({self.in_features}, {self.out_features}, bias={self.bias}, dtype='{self.dtype.name}'{prec})"


class Embedding(Module):
    """Lookup table: ``y[...] = E[ids[...]]``.

    ids (integers in [0, V), any shape) -> y [..., dim];  E [V, dim].
    Backward: dE[v] += sum of dy over the positions where ids == v (a scatter-add, so a
    repeated id collects every one of its gradients), by ``scatter_add_rows`` in an order
    fixed by the ids, so repeated runs give the same bits on the GPU too. ``grad_method``:
    "auto", "sort" or "onehot" (see there). The ids have no gradient.
    """

    multiplies = False          # a lookup, no matrix product: GEMM precision does not apply

    def __init__(self, num_embeddings: int, dim: int, dtype="float32", seed=None, backend=None,
                 grad_method: str = "auto"):
        super().__init__(dtype=dtype, backend=backend)
        self.num_embeddings = _check_size(num_embeddings, "num_embeddings")
        self.dim = _check_size(dim, "dim")
        if grad_method not in SCATTER_METHODS:
            raise InputError(f"grad_method must be one of {SCATTER_METHODS}, got {grad_method!r}")
        self.grad_method = grad_method
        rng = np.random.default_rng(seed)
        self._add_param("E", rng.standard_normal((self.num_embeddings, self.dim)))
        self._ids = None

    def forward(self, ids):
        """ids int [...] -> y [..., dim]."""
        host = ids if isinstance(ids, np.ndarray) else None     # ranges of host ids: checked before upload
        ids = as_array(self.backend, ids, "ids", dims="(integer token ids)")
        if ids.dtype.kind not in "iu":
            raise InputError(f"ids must be an integer array, got dtype {ids.dtype}; "
                             f"convert token ids with .astype('int64')")
        check_range(self.backend, ids if host is None else host, "ids", 0, self.num_embeddings, "num_embeddings")
        self._ids = ids
        return self.params["E"][ids]

    def backward(self, dy):
        """dy [..., dim] -> None; adds the scatter of dy into ``self.grads['E']``."""
        if self._ids is None:
            raise StateError("Embedding.backward called before forward")
        ids = self._ids
        dy = as_array(self.backend, dy, "dy", dtype=self.dtype,
                      shape=tuple(ids.shape) + (self.dim,), dims="[..., dim]")
        scatter_add_rows(self.xp, self.grads["E"], ids.reshape(-1), dy.reshape(-1, self.dim), self.grad_method)
        return None

    def __call__(self, ids):
        return self.forward(ids)

    def __repr__(self):
        return f"Embedding({self.num_embeddings}, {self.dim}, dtype='{self.dtype.name}')"


def _accepts(fn, name: str) -> bool:
    """True when ``fn`` has a parameter ``name`` (or takes **kwargs)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD
               for p in sig.parameters.values())


def _has_param(fn, name: str) -> bool:
    """True when ``fn`` names ``name`` explicitly (a **kwargs catch-all does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Sequential(Module):
    """Children run in order: ``y = m_{n-1}(... m_1(m_0(x)))``; backward in reverse.

    Parameters appear as ``"<index>.<name>"`` (e.g. ``"0.E"``, ``"1.W_l0"``). ``params`` and
    ``grads`` are rebuilt from the children on each access, so they hold the children's
    current arrays (an optimiser that updates them in place updates the children).

    A child whose forward returns a tuple (the LSTM: ``(y, (h_n, c_n))``) passes element 0
    on; the rest is kept in ``self.states[i]``. ``forward(x, state=s)`` gives ``s`` to the
    first child whose forward has a ``state`` parameter, and ``self.last_state`` is what that
    child returned as its state, so a language model carries it to the next window with
    ``seq.forward(x_next, state=seq.last_state)``.
    """

    def __init__(self, *modules):
        if not modules:
            raise InputError("Sequential needs at least one module")
        for i, m in enumerate(modules):
            if not (hasattr(m, "forward") and hasattr(m, "backward") and hasattr(m, "params")):
                raise InputError(f"Sequential: modules[{i}] ({type(m).__name__}) is not a module "
                                 "(needs forward, backward, params, grads)")
        names = {m.backend.name for m in modules}
        if len(names) > 1:
            raise InputError(f"Sequential: modules live on different backends {sorted(names)}; "
                             "move them with .to(...) first")
        # Module.__init__ is skipped on purpose: params/grads here are views of the children
        self.modules = list(modules)
        self.training = modules[0].training
        self.states: dict = {}
        self._state_index = next((i for i, m in enumerate(self.modules)
                                  if _has_param(m.forward, "state")), None)

    # -- the things Module keeps as attributes are derived from the children here ----------
    @property
    def backend(self):
        return self.modules[0].backend

    @property
    def dtype(self):
        return self.modules[0].dtype

    @property
    def precision(self) -> str:
        """The GEMM precision of the children that multiply ('mixed' when they differ); setting it
        sets theirs (an Embedding is a lookup: its precision stays as it is)."""
        found = {m.precision for m in self._multiplying()}
        return found.pop() if len(found) == 1 else ("float32" if not found else "mixed")

    @precision.setter
    def precision(self, value) -> None:
        from .precision import check_precision

        check_precision(value, self.dtype)          # refuse before changing any child
        for m in self._multiplying():
            m.precision = value

    def _multiplying(self):
        return [m for m in self.modules if hasattr(m, "precision") and getattr(m, "multiplies", True)]

    @property
    def params(self) -> dict:
        return {f"{i}.{k}": v for i, m in enumerate(self.modules) for k, v in m.params.items()}

    @property
    def grads(self) -> dict:
        return {f"{i}.{k}": v for i, m in enumerate(self.modules) for k, v in m.grads.items()}

    @property
    def last_state(self):
        """The state returned by the child that takes ``state`` (None before forward or without one)."""
        if self._state_index is None:
            return None
        return self.states.get(self._state_index)

    def __len__(self):
        return len(self.modules)

    def __getitem__(self, i):
        return self.modules[i]

    def __iter__(self):
        return iter(self.modules)

    # -- forward / backward ---------------------------------------------------------------
    def forward(self, x, state=None, **kwargs):
        """x -> output of the last child; ``state`` and ``kwargs`` go to the children that accept them."""
        if state is not None and self._state_index is None:
            raise InputError("state was given but no module in this Sequential has a 'state' parameter")
        unused = [k for k in kwargs if not any(_accepts(m.forward, k) for m in self.modules)]
        if unused:
            raise InputError(f"Sequential.forward: no module accepts the keyword(s) {unused}")
        self.states = {}
        for i, m in enumerate(self.modules):
            kw = {k: v for k, v in kwargs.items() if _accepts(m.forward, k)}
            if i == self._state_index and state is not None:
                kw["state"] = state
            out = m.forward(x, **kw)
            if isinstance(out, tuple):
                self.states[i] = out[1] if len(out) == 2 else out[1:]
                out = out[0]
            x = out
        return x

    def backward(self, dy):
        """dy (gradient of the output) -> gradient of the input (None when the first child is an Embedding)."""
        for i in range(len(self.modules) - 1, -1, -1):
            d = self.modules[i].backward(dy)
            if isinstance(d, tuple):
                d = d[0]
            if d is None and i > 0:
                raise StateError(f"Sequential.backward: modules[{i}] ({type(self.modules[i]).__name__}) "
                                 "returned no input gradient, so the modules before it get none; "
                                 "an Embedding can only be the first module")
            dy = d
        return dy

    def __call__(self, x, **kwargs):
        return self.forward(x, **kwargs)

    # -- Module operations, applied to every child ------------------------------------------
    def zero_grad(self) -> None:
        for m in self.modules:
            m.zero_grad()

    def train(self, mode: bool = True):
        self.training = mode
        for m in self.modules:
            m.train(mode)
        return self

    def to(self, backend):
        for m in self.modules:
            m.to(backend)
        return self

    def state_dict(self) -> dict:
        return {f"{i}.{k}": v for i, m in enumerate(self.modules) for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.params) - set(state)
        extra = set(state) - set(self.params)
        if missing or extra:
            raise InputError(f"load_state_dict: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
        for i, m in enumerate(self.modules):
            prefix = f"{i}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    def __repr__(self):
        inner = ",\n  ".join(repr(m) for m in self.modules)
        return f"Sequential(\n  {inner}\n)"
