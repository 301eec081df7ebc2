"""Adam (``xlstm.ops.adam``), clipping (``xlstm.ops.clip``), softmax cross-entropy
(``xlstm.ops.softmax_xent``) and the embedding scatter (``xlstm.ops.embedding_scatter``):
each implementation against an independent reference, the kernels' host builds against NumPy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from xlstm import flat, optim
from xlstm.backends import resolve
from xlstm.losses import cross_entropy
from xlstm.ops import adam, softmax_xent
from xlstm.ops.embedding_scatter import SCATTER_METHODS, scatter_add_rows


def test_adam_passes_equal_the_textbook_update_in_float64():
    rng = np.random.default_rng(0)
    n, lr, b1, b2, eps, wd = 50, 1e-2, 0.9, 0.999, 1e-8, 0.01
    p, m, v = rng.standard_normal(n), np.zeros(n), np.zeros(n)
    P, M, V = p.copy(), m.copy(), v.copy()
    be = resolve("numpy")
    for t in range(1, 4):
        g = rng.standard_normal(n)
        adam.passes(be, p, g, m, v, 1 - lr * wd, b1, 1 - b1, b2, 1 - b2, math.sqrt(1 - b2 ** t), eps,
                    lr / (1 - b1 ** t))
        P *= 1 - lr * wd                          # AdamW, as torch.optim.AdamW writes it
        M = b1 * M + (1 - b1) * g
        V = b2 * V + (1 - b2) * g * g
        P -= lr * (M / (1 - b1 ** t)) / (np.sqrt(V / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(p, P, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_kernel_equals_the_numpy_passes_bitwise(emulated, dtype):
    be, _ = emulated
    nb = resolve("numpy")
    rng = np.random.default_rng(1)
    n = 1000
    host = [rng.standard_normal(n).astype(dtype) for _ in range(3)] + [rng.random(n).astype(dtype)]
    dev = [be.asarray(a.copy()) for a in host]
    coef = (0.999, 0.9, 0.1, 0.999, 0.001, 0.05, 1e-8, 3e-3)
    adam.passes(nb, host[0], host[1], host[2], host[3], *coef)
    be.adam_step(dev[0], dev[1], dev[2], dev[3], *coef)
    for h, d in zip(host, dev):
        assert np.asarray(be.to_numpy(d)).tobytes() == h.tobytes()


def test_adam_step_refuses_a_wrong_argument_by_its_declared_name(emulated):
    be, _ = emulated
    p = be.asarray(np.zeros(4, np.float32))
    with pytest.raises(Exception, match=r"\bm has shape"):
        be.adam_step(p, p, be.asarray(np.zeros(3, np.float32)), p, *(1.0,) * 8)


def test_declared_flat_views_take_the_fused_clip_and_undeclared_ones_do_not(host_lib, monkeypatch):
    """The flat path is taken because the views were declared (``flat.views``), not because
    arrays happen to lie next to each other in memory."""
    from support.standin import install_fakes
    from xlstm import backends

    fake = install_fakes(host_lib, monkeypatch, nvmath=True, counting=True)
    be = backends._cupy_backend()
    g0 = np.random.default_rng(2).standard_normal(100).astype(np.float32) * 3
    declared = flat.views(be.asarray(g0.copy()), [(10, 5), (50,)])
    buf = be.asarray(g0.copy())
    adjacent = [buf[:50].reshape(10, 5), buf[50:]]
    assert flat.buffer_of(declared) is not None and flat.buffer_of(adjacent) is None
    fake.counts.reset()
    n1 = optim.clip_grad_norm(declared, 1.0, on_device=True)
    assert dict(fake.counts.ops) == {"raw:grad_norm_f32": 1, "raw:clip_by_norm_f32": 1}
    fake.counts.reset()
    n2 = optim.clip_grad_norm(adjacent, 1.0, on_device=True)
    assert not any(k.startswith("raw:") for k in fake.counts.ops)
    t1, t2 = (float(np.asarray(n).view(np.ndarray)) for n in (n1, n2))
    assert abs(t1 - t2) <= 1e-5 * t2


def test_flat_views_fill_the_buffer_and_say_so():
    buf = np.arange(10.0)
    a, b = flat.views(buf, [(2, 3), (4,)])
    assert np.shares_memory(a, buf) and a.shape == (2, 3) and b[0] == 6.0
    assert flat.buffer_of([a, b]) is buf and flat.buffer_of([a]) is None and flat.buffer_of([b, a]) is None
    a += 1                                          # an in-place op keeps the declaration
    assert flat.buffer_or([a, b]) == [buf]
    with pytest.raises(ValueError, match="hold 5 elements"):
        flat.views(np.zeros(6), [(5,)])


def _xent_reference(x, t):
    """Loss per row and gradient of the mean, in float64 from the definition (no shift)."""
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    nll = -np.log(p[np.arange(len(t)), t])
    d = p.copy()
    d[np.arange(len(t)), t] -= 1
    return nll, d / len(t)


def test_softmax_xent_rows_equal_the_definition_and_the_finite_differences():
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((6, 7)), rng.integers(0, 7, 6)
    nll, d = resolve("numpy").softmax_cross_entropy(x, t, 6)
    nll_ref, d_ref = _xent_reference(x, t)
    np.testing.assert_allclose(nll, nll_ref, rtol=1e-13)
    np.testing.assert_allclose(d, d_ref, rtol=1e-12, atol=1e-15)
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        keep = x[idx]
        x[idx] = keep + 1e-6
        up = softmax_xent.rows(np, x, t)[0].mean()
        x[idx] = keep - 1e-6
        down = softmax_xent.rows(np, x, t)[0].mean()
        x[idx] = keep
        num[idx] = (up - down) / 2e-6
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)
    big = np.array([[1000.0, 0.0], [-1000.0, 0.0]])     # stable for any finite logits
    assert np.all(np.isfinite(softmax_xent.rows(np, big, np.array([1, 0]))[0]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_xent_kernel_equals_numpy(emulated, dtype):
    be, _ = emulated
    rng = np.random.default_rng(4)
    x, t = (rng.standard_normal((5, 300)) * 4).astype(dtype), rng.integers(0, 300, 5)
    loss_n, d_n = cross_entropy(x, t)
    loss_d, d_d = cross_entropy(be.asarray(x), be.asarray(t))
    tol = 1e-6 if dtype == "float32" else 1e-13
    assert abs(loss_d - loss_n) <= tol * abs(loss_n)
    np.testing.assert_allclose(be.to_numpy(d_d), d_n, rtol=tol, atol=tol * np.abs(d_n).max())


@pytest.mark.parametrize("method", SCATTER_METHODS)
def test_embedding_scatter_equals_add_at(method):
    rng = np.random.default_rng(5)
    ids, rows = rng.integers(0, 9, 40), rng.standard_normal((40, 3))
    out, want = np.ones((9, 3)), np.ones((9, 3))
    scatter_add_rows(np, out, ids, rows, method)
    np.add.at(want, ids, rows)
    np.testing.assert_allclose(out, want, rtol=1e-13)
