"""Backend registry and the NumPy backend's fused pointwise step against the readable reference."""
import os
import subprocess
import sys

import numpy as np
import pytest

import xlstm
from xlstm import cell
from xlstm.backends import NumpyBackend, backend_of, get_backend, resolve
from xlstm.errors import BackendUnavailableError, InputError


# -- registry ----------------------------------------------------------------------------------
def test_numpy_always_available_and_use_backend_restores():
    assert "numpy" in xlstm.available_backends()
    before = get_backend()
    with xlstm.use_backend("numpy") as b:
        assert get_backend() is b and b.name == "numpy" and b.xp is np
    assert get_backend() is before


def test_unknown_backend_name():
    with pytest.raises(InputError, match="one of"):
        xlstm.set_backend("tpu")


def test_models_live_on_the_backend_they_were_built_on():
    with xlstm.use_backend("numpy"):
        m = xlstm.LSTM(2, 3)
    assert m.backend.name == "numpy" and backend_of(m.params["l0.W"]).name == "numpy"


def test_env_var_selects_default_backend():
    env = dict(os.environ, XLSTM_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", "import xlstm; print(xlstm.get_backend().name)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"
    env["XLSTM_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", "import xlstm; xlstm.get_backend()"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "bogus" in out.stderr


def test_explicit_cupy_without_gpu_raises_with_reason():
    reason = xlstm.backends.cupy_unavailable_reason()
    if reason is None:
        assert resolve("cupy").name == "cupy"          # a GPU machine: it must work
        return
    with pytest.raises(BackendUnavailableError) as e:
        xlstm.set_backend("cupy")
    assert reason in str(e.value) and "numpy" in str(e.value)
    assert get_backend().name == "numpy"                 # the failed switch changed nothing


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

# -- arrays kept on the host own their memory (issue 9) -----------------------------------------
def test_to_numpy_copy_owns_its_memory():
    be = xlstm.backends.resolve("numpy")
    a = np.arange(6.0).reshape(2, 3)
    assert be.to_numpy(a) is a or np.shares_memory(be.to_numpy(a), a)   # the documented view
    kept = be.to_numpy(a, copy=True)
    a += 1
    np.testing.assert_array_equal(kept, np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("D,H", [(1, 3), (2, 1), (1, 1), (3, 2)])
def test_what_callers_keep_does_not_follow_later_training(D, H):
    """state_dict, to_torch_state_dict (params and grads) and the optimizer's state_dict are
    snapshots: a later backward/step must not change them. (With D or H = 1 the transposed
    weights were views: ``np.ascontiguousarray(W.T)`` does not copy a [1,4H] array.)"""
    from xlstm import interop
    from xlstm.optim import Adam

    rng = np.random.default_rng(0)
    lstm = xlstm.LSTM(D, H, dtype="float64", seed=1)
    opt = Adam(lstm, lr=0.1)
    x, dy = rng.standard_normal((3, 2, D)), rng.standard_normal((3, 2, H))

    def train_step():
        lstm.forward(x)
        lstm.backward(dy)
        opt.step()

    train_step()
    kept = {"state_dict": lstm.state_dict(), "torch params": interop.to_torch_state_dict(lstm),
            "torch grads": interop.to_torch_state_dict(lstm, grads=True),
            "optimizer": {f"{k}/{b}": a for k, st in opt.state_dict()["state"].items() for b, a in st.items()}}
    frozen = {w: {k: v.copy() for k, v in d.items()} for w, d in kept.items()}
    for _ in range(2):
        train_step()
    for w, d in kept.items():
        for k, v in d.items():
            np.testing.assert_array_equal(v, frozen[w][k], err_msg=f"{w} {k} changed after training on")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_norm_mean_is_bitwise_np_mean(dtype):
    """The LayerNorm row mean skips np.mean's Python wrapper but must give its very numbers
    (the float64 results of the LayerNorm cell stay bitwise what they were)."""
    rng = np.random.default_rng(7)
    for shape in ((32, 4, 64), (5, 1, 13), (3, 4, 100), (2, 1, 3)):
        v = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
        got = np.empty(shape[:2], dtype)
        NumpyBackend._mean_rows(v, got)
        np.testing.assert_array_equal(got, np.mean(v, axis=2))


def test_host_reads_are_floats_at_once_and_a_check_raises_at_once():
    from xlstm import checks
    be = xlstm.backends.resolve("numpy")
    with be.deferred() as reads:
        reads.put("a", np.float64(1.5))
        reads.put(("b", 2), np.array(2.0))
        with pytest.raises(xlstm.InputError, match="bad input"):
            checks.require(be, np.bool_(False), lambda: "bad input")      # not queued: at once
        with be.deferred() as inner:                                      # nested: its own queue
            assert be.pending is inner
        assert be.pending is reads
        assert reads.read() == {"a": 1.5, ("b", 2): 2.0} and reads.read() == {}
    assert be.pending is None
