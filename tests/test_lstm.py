"""The LSTM layer on NumPy: independent values, finite differences, dtypes, state, bad input."""
import numpy as np
import pytest

import xlstm
from xlstm import LSTM, InputError, StateError
from xlstm.gradcheck import gradcheck_lstm, scaled_error


# -- values from TensorFlow's own LSTM cell tests (../shared/vectors, section 1) --------------
def test_tensorflow_single_cell_values():
    kernel = np.full((3 + 2, 8), 0.5, np.float32)
    bias = np.full(8, 0.5, np.float32)
    lstm = xlstm.interop.from_tf(kernel, bias, forget_bias=1.0)
    x = np.ones((1, 1, 3), np.float32)
    h0 = np.array([[[0.2, 0.3]]], np.float32)
    c0 = np.array([[[0.0, 0.1]]], np.float32)
    y, (h, c) = lstm.forward(x, (h0, c0))
    np.testing.assert_allclose(h[0, 0], [0.64121795, 0.68166804], rtol=1e-6)
    np.testing.assert_allclose(c[0, 0], [0.88477188, 0.98103917], rtol=1e-6)
    np.testing.assert_array_equal(y[0], h[0])


def test_from_tf_reorders_gate_columns():
    """TF's columns are i, j, f, o; a kernel that only feeds j must drive our g block."""
    D, H = 2, 3
    kernel = np.zeros((D + H, 4 * H))
    kernel[:D, H:2 * H] = 1.0                               # TF block 1 = j (candidate)
    lstm = xlstm.interop.from_tf(kernel, np.zeros(4 * H), forget_bias=0.0)
    W = lstm.params["l0.W"]
    assert np.all(W[:, 2 * H:3 * H] == 1.0) and np.count_nonzero(W) == D * H


# -- hand-computed single step ------------------------------------------------------------
def test_single_step_by_hand():
    """One step with H=1, written out with math.exp: independent of the vectorised code."""
    import math
    lstm = LSTM(1, 1, dtype="float64", forget_bias=0.7)
    W = np.array([[0.1, -0.2, 0.3, 0.4]]); U = np.array([[0.5, 0.6, -0.7, 0.8]]); b = np.array([0.01, 0.02, 0.03, 0.04])
    lstm.load_state_dict({"l0.W": W, "l0.U": U, "l0.b": b})
    x, h0, c0 = 2.0, -0.5, 0.25
    z = [W[0, k] * x + U[0, k] * h0 + b[k] for k in range(4)]
    sig = lambda v: 1 / (1 + math.exp(-v))
    i, f, g, o = sig(z[0]), sig(z[1] + 0.7), math.tanh(z[2]), sig(z[3])
    c = f * c0 + i * g
    h = o * math.tanh(c)
    y, (hn, cn) = lstm.forward(np.array([[[x]]]), (np.array([[[h0]]]), np.array([[[c0]]])))
    assert abs(hn.item() - h) < 1e-15 and abs(cn.item() - c) < 1e-15


# -- finite differences in float64 ----------------------------------------------------------
@pytest.mark.parametrize("T,B,D,H", [(1, 1, 1, 1), (1, 3, 2, 4), (5, 1, 3, 2), (6, 4, 5, 3), (3, 2, 4, 7)])
def test_gradcheck_single_layer(T, B, D, H):
    lstm = LSTM(D, H, dtype="float64", seed=T * 100 + H)
    x = np.random.default_rng(T + B).standard_normal((T, B, D))
    report = gradcheck_lstm(lstm, x, tol=1e-7)
    assert set(report.errors) == {"l0.W", "l0.U", "l0.b", "x", "h0", "c0"}
    assert report.ok, report


def test_gradcheck_detects_a_wrong_gradient():
    """The check must be able to fail: corrupt one analytic gradient and see it caught."""
    lstm = LSTM(2, 3, dtype="float64", seed=0)
    orig = lstm._backward_direction

    def wrong(*a, **k):
        out = orig(*a, **k)
        lstm.grads["l0.U"][0, 0] += 1e-3
        return out

    lstm._backward_direction = wrong
    report = gradcheck_lstm(lstm, np.random.default_rng(0).standard_normal((4, 2, 2)), max_entries=None)
    assert not report.ok and report.errors["l0.U"] > 1e-4 and report.errors["l0.W"] < 1e-7


def test_gradients_accumulate_and_zero_grad():
    lstm = LSTM(3, 4, dtype="float64", seed=1)
    x = np.random.default_rng(2).standard_normal((4, 2, 3))
    y, _ = lstm.forward(x)
    lstm.backward(np.ones_like(y))
    g1 = {k: v.copy() for k, v in lstm.grads.items()}
    lstm.backward(np.ones_like(y))                      # the cache survives: backward twice
    for k in g1:
        np.testing.assert_allclose(lstm.grads[k], 2 * g1[k], rtol=1e-12)
    lstm.zero_grad()
    assert all(not v.any() for v in lstm.grads.values())


def test_forget_bias_is_a_constant_not_a_parameter():
    a = LSTM(3, 4, dtype="float64", seed=3, forget_bias=0.0)
    b = LSTM(3, 4, dtype="float64", seed=3, forget_bias=1.0)
    sd = a.state_dict()
    sd["l0.b"][4:8] += 1.0                              # fold the constant into the forget block
    a.load_state_dict(sd)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    np.testing.assert_allclose(a.forward(x)[0], b.forward(x)[0], rtol=1e-13)
    assert set(b.params) == {"l0.W", "l0.U", "l0.b"}


# -- dtypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)])
def test_float32_agrees_with_float64(layers, bidir):
    l64 = LSTM(4, 6, num_layers=layers, bidirectional=bidir, dtype="float64", seed=7)
    l32 = LSTM(4, 6, num_layers=layers, bidirectional=bidir, dtype="float32", seed=7)
    l32.load_state_dict({k: v.astype(np.float32) for k, v in l64.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 4))
    dy = rng.standard_normal((8, 3, 6 * (2 if bidir else 1)))
    y64, (h64, c64) = l64.forward(x)
    y32, (h32, c32) = l32.forward(x.astype(np.float32))
    assert y32.dtype == np.float32 and h32.dtype == np.float32
    dx64, _ = l64.backward(dy)
    dx32, _ = l32.backward(dy.astype(np.float32))
    assert dx32.dtype == np.float32 and all(g.dtype == np.float32 for g in l32.grads.values())
    for a, b in [(y32, y64), (h32, h64), (c32, c64), (dx32, dx64)] + [(l32.grads[k], l64.grads[k]) for k in l64.grads]:
        assert scaled_error(a, b) < 1e-5


def test_defaults_and_init():
    lstm = LSTM(3, 16, seed=0)
    assert lstm.dtype == np.float32 and lstm.forget_bias == 1.0
    bound = 1 / np.sqrt(16)
    for k, v in lstm.params.items():
        assert v.dtype == np.float32 and np.abs(v).max() <= bound
    assert lstm.params["l0.W"].shape == (3, 64) and lstm.params["l0.U"].shape == (16, 64)
    np.testing.assert_array_equal(LSTM(3, 16, seed=0).params["l0.U"], lstm.params["l0.U"])
    assert not np.array_equal(LSTM(3, 16, seed=1).params["l0.U"], lstm.params["l0.U"])


def test_zero_state_default_equals_explicit_zeros():
    lstm = LSTM(3, 4, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((3, 2, 3))
    z = np.zeros((1, 2, 4))
    np.testing.assert_array_equal(lstm.forward(x)[0], lstm.forward(x, (z, z))[0])


def test_state_carries_across_calls():
    """Running T steps at once equals running them in two windows with the state passed on."""
    lstm = LSTM(3, 4, num_layers=2, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((6, 2, 3))
    y, (h, c) = lstm.forward(x)
    y1, s1 = lstm.forward(x[:4])
    y2, (h2, c2) = lstm.forward(x[4:], s1)
    np.testing.assert_allclose(np.concatenate([y1, y2]), y, rtol=1e-14)
    np.testing.assert_allclose(h2, h, rtol=1e-14)


# -- bad input ------------------------------------------------------------------------------
def _model():
    return LSTM(3, 4, dtype="float32", seed=0)


@pytest.mark.parametrize("x,words", [
    (np.zeros((2, 3), np.float32), ["x", "3 dimensions", "(2, 3)"]),
    (np.zeros((2, 1, 5), np.float32), ["x", "D=5", "input_size=3"]),
    (np.zeros((2, 1, 3), np.float64), ["x", "float64", "float32"]),
    (np.full((2, 1, 3), np.nan, np.float32), ["x", "NaN"]),
    (np.full((2, 1, 3), np.inf, np.float32), ["x", "Inf"]),
    (np.zeros((0, 1, 3), np.float32), ["x", "at least 1"]),
    ([["a"]], ["x"]),
])
def test_bad_x(x, words):
    with pytest.raises(InputError) as e:
        _model().forward(x)
    for w in words:
        assert w in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_state():
    m = _model()
    x = np.zeros((2, 5, 3), np.float32)
    good = np.zeros((1, 5, 4), np.float32)
    with pytest.raises(InputError, match=r"h0.*\(1, 4, 4\).*\(1, 5, 4\)"):
        m.forward(x, (np.zeros((1, 4, 4), np.float32), good))      # batch mismatch
    with pytest.raises(InputError, match=r"c0.*float64.*float32"):
        m.forward(x, (good, good.astype(np.float64)))
    with pytest.raises(InputError, match="tuple"):
        m.forward(x, good)
    with pytest.raises(InputError, match="NaN"):
        m.forward(x, (good, np.full_like(good, np.nan)))


def test_bad_dy_and_order():
    m = _model()
    with pytest.raises(StateError, match="before forward"):
        m.backward(np.zeros((2, 1, 4), np.float32))
    m.forward(np.zeros((2, 1, 3), np.float32))
    with pytest.raises(InputError, match=r"dy.*\(2, 1, 5\).*\(2, 1, 4\)"):
        m.backward(np.zeros((2, 1, 5), np.float32))
    with pytest.raises(InputError, match="dh_n"):
        m.backward(np.zeros((2, 1, 4), np.float32), (np.zeros((1, 2, 4), np.float32), None))


@pytest.mark.parametrize("kwargs,word", [
    (dict(input_size=0, hidden_size=2), "input_size"),
    (dict(input_size=2, hidden_size=-1), "hidden_size"),
    (dict(input_size=2, hidden_size=2, num_layers=0), "num_layers"),
    (dict(input_size=2, hidden_size=2, dtype="float16"), "dtype"),
    (dict(input_size=2, hidden_size=2, zoneout=1.0), "zoneout"),
    (dict(input_size=2, hidden_size=2, forget_bias=float("nan")), "forget_bias"),
    (dict(input_size=2.5, hidden_size=2), "input_size"),
])
def test_bad_constructor_arguments(kwargs, word):
    with pytest.raises(InputError, match=word):
        LSTM(**kwargs)


def test_integer_input_is_converted_but_float_precision_is_not_silently_changed():
    m = _model()
    y, _ = m.forward(np.ones((2, 1, 3), np.int64))
    assert y.dtype == np.float32


def test_batch_first_is_the_time_major_model_transposed():
    # the same seed and weights: batch_first=True takes and gives [B,T,...], and every output,
    # input gradient, state and parameter gradient equals the time-major model's, bit for bit
    rng = np.random.default_rng(21)
    kw = dict(num_layers=2, bidirectional=True, seed=3, dtype="float64", zoneout=0.1, recurrent_dropout=0.1)
    tm, bf = xlstm.LSTM(3, 5, **kw), xlstm.LSTM(3, 5, batch_first=True, **kw)
    x = rng.standard_normal((6, 4, 3))                  # [T,B,D]
    lengths = [6, 2, 5, 1]
    y1, s1 = tm.forward(x, lengths=lengths)
    y2, s2 = bf.forward(x.transpose(1, 0, 2).tolist(), lengths=lengths)     # [B,T,D], as a list too
    assert y2.shape == (4, 6, 10) and np.array_equal(y2, y1.transpose(1, 0, 2))
    assert all(np.array_equal(a, b) for a, b in zip(s1, s2))
    dy = rng.standard_normal(y1.shape)
    dx1, ds1 = tm.backward(dy)
    dx2, ds2 = bf.backward(dy.transpose(1, 0, 2))
    assert dx2.shape == (4, 6, 3) and np.array_equal(dx2, dx1.transpose(1, 0, 2))
    assert all(np.array_equal(a, b) for a, b in zip(ds1, ds2))
    assert all(np.array_equal(tm.grads[k], bf.grads[k]) for k in tm.grads)
    with pytest.raises(xlstm.InputError, match=r"\[B,T,\.\.\.\] \(batch_first=True\)"):
        bf.forward(np.zeros((4, 3)))
    assert "batch_first=True" in repr(bf) and "batch_first" not in repr(tm)


def test_release_cache_frees_the_activations_and_backward_then_asks_for_a_forward():
    m = _model()
    x = np.ones((4, 2, 3), np.float32)
    y, _ = m.forward(x)
    m.release_cache()
    with pytest.raises(StateError, match="before forward"):
        m.backward(np.ones_like(y))
    y, _ = m.forward(x)
    m.backward(np.ones_like(y))         # a new forward makes backward possible again
