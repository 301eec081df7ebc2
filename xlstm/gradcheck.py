"""Finite-difference gradient checks, for xlstm's tests and for users' own models.

    report = gradcheck_lstm(lstm, x, state=None, lengths=None)
    assert report.ok, report

The loss is L = sum(y * Ry) + sum(h_n * Rh) + sum(c_n * Rc) with fixed random R, so every
output and final state carries gradient. Each entry (or a random sample of entries, for big
tensors) of every parameter, of x and of the initial state is perturbed by +-eps, and the
central difference (L(+) - L(-)) / 2eps is compared with the analytic gradient. Run it in
float64: in float32 the difference quotient itself is only good to about 1e-3.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class GradcheckReport:
    """error per checked tensor (``scaled_error``); ``ok`` when all are under ``tol``."""
    errors: dict = field(default_factory=dict)
    tol: float = 1e-6

    @property
    def ok(self) -> bool:
        return all(e <= self.tol for e in self.errors.values())

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def __str__(self) -> str:
        rows = [f"  {k:<24} {v:.3e} {'ok' if v <= self.tol else 'FAIL'}" for k, v in self.errors.items()]
        return f"gradcheck (tol {self.tol:g}):\n" + "\n".join(rows)


def rel_error(a, b, floor: float = 1e-8) -> float:
    """max |a-b| / max(|a|, |b|, floor) elementwise: relative, but sane near zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), floor), initial=0.0))


def scaled_error(a, b, floor: float = 1e-12) -> float:
    """max |a-b| / max(|a|): the error relative to the tensor's largest entry.

    Central differences carry an absolute error of about eps^2 |f'''| + 1e-16 |f| / eps, so
    entries near zero would show large elementwise relative errors that mean nothing.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)), floor)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def numerical_grad(f, a, eps=1e-6, max_entries=None, rng=None):
    """Central differences of scalar f() w.r.t. array ``a`` (perturbed in place and restored).

    Returns (indices checked, numerical gradient at them).
    """
    flat = a.reshape(-1)
    n = flat.size
    idx = np.arange(n)
    if max_entries is not None and n > max_entries:
        idx = np.sort((rng or np.random.default_rng(0)).choice(n, max_entries, replace=False))
    out = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = flat[i].item()
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        out[j] = (fp - fm) / (2 * eps)
    return idx, out


def numerical_gradient(f, a, eps=1e-6):
    """Central differences of scalar f() w.r.t. every entry of ``a``, shaped like ``a``.

    For checking your own modules: perturb a parameter array in place, compare with its grad.
    """
    return numerical_grad(f, a, eps)[1].reshape(a.shape)


def gradcheck_lstm(lstm, x, state=None, lengths=None, eps=1e-6, tol=1e-6, max_entries=60, seed=0):
    """Check every gradient of ``lstm`` (params, x, h0, c0) against central differences.

    The model should be float64; its dropout/zoneout masks are drawn once and reused, so the
    loss is a fixed smooth function. Returns a GradcheckReport.
    """
    be = lstm.backend
    rng = np.random.default_rng(seed)
    x = be.asarray(np.array(be.to_numpy(x), dtype=lstm.dtype))
    T, B = x.shape[:2]
    S = (lstm.num_layers * lstm.num_directions, B, lstm.hidden_size)
    if state is None:
        state = (rng.standard_normal(S) * 0.5, rng.standard_normal(S) * 0.5)
    h0, c0 = (be.asarray(np.array(be.to_numpy(s), dtype=lstm.dtype)) for s in state)
    y, (hn, cn) = lstm.forward(x, (h0, c0), lengths)
    masks = lstm.last_masks
    Ry, Rh, Rc = (be.asarray(rng.standard_normal(a.shape).astype(lstm.dtype)) for a in (y, hn, cn))

    def loss():
        y, (hn, cn) = lstm.forward(x, (h0, c0), lengths, masks=masks)
        return float((y * Ry).sum() + (hn * Rh).sum() + (cn * Rc).sum())

    loss()
    lstm.zero_grad()
    dx, (dh0, dc0) = lstm.backward(Ry, (Rh, Rc))
    analytic = {k: be.to_numpy(g).copy() for k, g in lstm.grads.items()}
    analytic.update(x=be.to_numpy(dx), h0=be.to_numpy(dh0), c0=be.to_numpy(dc0))
    tensors = dict(lstm.params)
    tensors.update(x=x, h0=h0, c0=c0)
    report = GradcheckReport(tol=tol)
    for name, a in tensors.items():
        if be.name != "numpy":
            raise NotImplementedError("gradcheck_lstm perturbs arrays entry by entry; run it on the numpy backend")
        idx, num = numerical_grad(loss, a, eps, max_entries, rng)
        report.errors[name] = scaled_error(num, analytic[name].reshape(-1)[idx])
    return report
