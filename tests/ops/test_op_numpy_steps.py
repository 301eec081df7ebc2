"""The NumPy implementations of the cell steps and time loops against the readable reference
(``cell.py``) and against the per-step loop: per dtype, with every modifier, at extreme inputs,
with the layer's aliasing; the fast loops bitwise where they promise it."""
import numpy as np
import pytest

import xlstm
from xlstm import cell
from xlstm.backends import NumpyBackend


# -- fused NumPy step vs the reference in cell.py ------------------------------------------------
def _inputs(rng, B, H, dtype, scale=1.0, options=()):
    z = (rng.standard_normal((B, 4 * H)) * scale).astype(dtype)
    c_prev = (rng.standard_normal((B, H)) * scale).astype(dtype)
    h_prev = rng.uniform(-1, 1, (B, H)).astype(dtype)
    kw = {}
    if "mask" in options:
        kw["mask"] = (np.arange(B) % 3 != 1).astype(dtype)
    if "zone" in options:
        kw["zc"] = (rng.random((B, H)) < 0.3).astype(dtype)
        kw["zh"] = np.full((B, H), 0.25, dtype)
    if "drop" in options:
        kw["gmask"] = ((rng.random((B, H)) < 0.7) / 0.7).astype(dtype)
    grads = [rng.standard_normal((B, H)).astype(dtype) for _ in range(3)]
    return z, c_prev, h_prev, kw, grads


OPTIONS = [(), ("mask",), ("zone",), ("drop",), ("mask", "zone", "drop")]
TOL = {"float64": 1e-13, "float32": 1e-6}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_numpy_step_matches_reference(dtype, options, scale):
    rng = np.random.default_rng(int(scale) + len(options))
    B, H = 5, 7
    z, c_prev, h_prev, kw, (dy, dh_next, dc_next) = _inputs(rng, B, H, dtype, scale, options)
    gates_ref, c_ref, h_ref = cell.pointwise_forward(z.astype(np.float64), c_prev.astype(np.float64),
                                                     h_prev.astype(np.float64), 0.8,
                                                     **{k: v.astype(np.float64) for k, v in kw.items()})
    be = NumpyBackend()
    gates, c, h = z.copy(), np.empty_like(c_prev), np.empty_like(h_prev)
    be.lstm_forward_step(gates, c_prev, h_prev, c, h, 0.8, **kw)
    assert gates.dtype == c.dtype == h.dtype == np.dtype(dtype)
    # float32 sums like f*c_prev + i*g lose digits relative to their terms (~scale), not the result
    atol = TOL[dtype] * scale
    for a, b in [(gates, gates_ref), (c, c_ref), (h, h_ref)]:
        np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=atol)
    dz_ref, dcp_ref, dhs_ref = cell.pointwise_backward(gates.astype(np.float64), c_prev.astype(np.float64),
                                                       dy.astype(np.float64), dh_next.astype(np.float64),
                                                       dc_next.astype(np.float64),
                                                       **{k: v.astype(np.float64) for k, v in kw.items()})
    dz, dcp, dhs = np.empty_like(z), np.empty_like(c_prev), np.empty_like(c_prev)
    be.lstm_backward_step(gates, c_prev, dy, dh_next, dc_next, dz, dcp, dhs, **kw)
    for a, b in [(dz, dz_ref), (dcp, dcp_ref), (dhs, dhs_ref)]:
        np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=atol * max(1.0, np.abs(b).max()))
    assert np.all(np.isfinite(dz))


@pytest.mark.parametrize("options", OPTIONS)
def test_numpy_backward_step_allows_aliasing(options):
    """The layer passes dc_prev=dc_next and dh_skip=dh_next to save buffers; results must not change."""
    rng = np.random.default_rng(0)
    z, c_prev, h_prev, kw, (dy, dh_next, dc_next) = _inputs(rng, 4, 3, "float64", 1.0, options)
    be = NumpyBackend()
    gates, c, h = z.copy(), np.empty_like(c_prev), np.empty_like(h_prev)
    be.lstm_forward_step(gates, c_prev, h_prev, c, h, 1.0, **kw)
    dz1, dcp, dhs = np.empty_like(z), np.empty_like(c_prev), np.empty_like(c_prev)
    be.lstm_backward_step(gates, c_prev, dy, dh_next, dc_next, dz1, dcp, dhs, **kw)
    dz2, dh, dc = np.empty_like(z), dh_next.copy(), dc_next.copy()
    be.lstm_backward_step(gates, c_prev, dy, dh, dc, dz2, dc, dh, **kw)
    np.testing.assert_array_equal(dz1, dz2)
    np.testing.assert_array_equal(dcp, dc)
    np.testing.assert_array_equal(dhs, dh)


def test_extremes_do_not_overflow():
    be = NumpyBackend()
    z = np.array([[-1e4, 1e4, -1e4, 1e4, 1e4, -1e4, 1e4, -1e4]], np.float32)
    c_prev = np.array([[1e3, -1e3]], np.float32)
    c, h = np.empty_like(c_prev), np.empty_like(c_prev)
    with np.errstate(all="raise"):
        be.lstm_forward_step(z, c_prev, np.zeros_like(c_prev), c, h, 1.0)
    # i, f, g, o saturate exactly, no NaN: sigmoid(-1e4)=0, sigmoid(1e4)=1, tanh(+-1e4)=+-1
    np.testing.assert_array_equal(z[0], [0, 1, 0, 1, 1, -1, 1, 0])
    np.testing.assert_array_equal(c[0], [1e3 * 0 + 0 * 1, -1e3 * 1 + 1 * -1])


def test_reference_step_matches_layer():
    """cell.step_forward/step_backward (the article's names, one step) equal the layer with T=1."""
    rng = np.random.default_rng(3)
    lstm = xlstm.LSTM(3, 4, dtype="float64", seed=3)
    W, U, b = (lstm.params[k] for k in ("l0.W", "l0.U", "l0.b"))
    x, h0, c0 = rng.standard_normal((2, 3)), rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    dy, dhn, dcn = (rng.standard_normal((2, 4)) for _ in range(3))
    h, c, cache = cell.step_forward(x, h0, c0, W, U, b, forget_bias=1.0)
    dx, dh0, dc0, dW, dU, db = cell.step_backward(dy, dhn, dcn, W, U, cache)
    y, (hn, cn) = lstm.forward(x[None], (h0[None], c0[None]))
    dx2, (dh02, dc02) = lstm.backward(dy[None], (dhn[None], dcn[None]))
    for a, b_ in [(h, hn[0]), (c, cn[0]), (dx, dx2[0]), (dh0, dh02[0]), (dc0, dc02[0]),
                  (dW, lstm.grads["l0.W"]), (dU, lstm.grads["l0.U"]), (db, lstm.grads["l0.b"])]:
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_backward_sequence_matches_per_step_loop(dtype):
    """The vectorised plain-cell BPTT (factors for all T steps before the loop) against the
    base class's per-step loop (lstm_backward_step + matmul_add)."""
    from xlstm.backends.base import Backend

    rng = np.random.default_rng(3)
    T, B, H = 7, 3, 8
    be = NumpyBackend()
    gates = np.empty((T, B, 4 * H), dtype)
    cs = np.empty((T + 1, B, H), dtype)
    hs = np.empty((T + 1, B, H), dtype)
    cs[0], hs[0] = rng.standard_normal((2, B, H))
    for t in range(T):
        gates[t] = rng.standard_normal((B, 4 * H))
        be.lstm_forward_step(gates[t], cs[t], hs[t], cs[t + 1], hs[t + 1], 1.0)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    UT = (rng.standard_normal((4 * H, H)) / np.sqrt(H)).astype(dtype)
    dh_n, dc_n = rng.standard_normal((2, B, H)).astype(dtype)
    results = []
    for run in (Backend.lstm_backward_sequence, NumpyBackend.lstm_backward_sequence):
        dz, dh, dc = np.empty((T, B, 4 * H), dtype), dh_n.copy(), dc_n.copy()
        run(be, gates, cs, dy, dh, dc, dz, UT)
        results.append((dz, dh, dc))
    tol = TOL[dtype]
    for a, b in zip(*results):
        assert a.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())



@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("forget_bias", [1.0, 0.0])
def test_numpy_forward_sequence_equals_per_step_loop_bitwise(dtype, forget_bias):
    """The NumPy forward loop (halves hoisted into the input gates and a scaled copy of U)
    against the base class's per-step loop (matmul_add + lstm_forward_step): every gate and
    state bitwise equal, since scaling by 0.5 is exact; the options fall back to the base loop."""
    from xlstm.backends.base import Backend

    rng = np.random.default_rng(5)
    T, B, H = 9, 4, 16
    be = NumpyBackend()
    g0 = rng.standard_normal((T, B, 4 * H)).astype(dtype) * 2
    U = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(dtype)
    h0, c0 = rng.standard_normal((2, B, H)).astype(dtype)
    zh = rng.uniform(0, 1, (T, B, H)).astype(dtype)
    for opts in ({}, {"zh": zh}):
        results = []
        for run in (Backend.lstm_forward_sequence, NumpyBackend.lstm_forward_sequence):
            g, hs, cs = g0.copy(), np.empty((T + 1, B, H), dtype), np.empty((T + 1, B, H), dtype)
            hs[0], cs[0] = h0, c0
            run(be, g, hs, cs, U, forget_bias, **opts)
            results.append((g, hs, cs))
        for a, b in zip(*results):
            assert a.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(a, b)
    # and not trivially: the states moved away from the initial ones
    assert np.abs(results[0][1][-1] - h0).max() > 0.1

@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_norm_mean_is_bitwise_np_mean(dtype):
    """The LayerNorm row mean skips np.mean's Python wrapper but must give its very numbers
    (the float64 results of the LayerNorm cell stay bitwise what they were)."""
    from xlstm.ops.ln_lstm_cell import mean_rows

    rng = np.random.default_rng(7)
    for shape in ((32, 4, 64), (5, 1, 13), (3, 4, 100), (2, 1, 3)):
        v = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        got = np.empty(shape[:2], dtype)
        mean_rows(v, got)
        np.testing.assert_array_equal(got, np.mean(v, axis=2))
