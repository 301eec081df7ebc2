"""Model options: stacked/bidirectional TensorFlow cells, torch round trips, recurrent dropout,
zoneout and variable lengths (values, reproducibility, gradients, bad input)."""
import numpy as np
import pytest

import xlstm
from xlstm import InputError, LSTM
from xlstm.gradcheck import gradcheck_lstm, scaled_error
from xlstm.interop import from_tf, from_tf_bidirectional


# -- TensorFlow reference values (shared/vectors/tf_reference_values.md) ------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tensorflow_two_stacked_cells_section2(dtype):
    k = np.full((2 + 2, 8), 0.5, dtype)
    b = np.full(8, 0.5, dtype)
    lstm = from_tf([k, k.copy()], [b, b.copy()], forget_bias=1.0, backend="numpy")
    assert lstm.num_layers == 2 and lstm.dtype.name == dtype
    h0 = np.array([[[0.2, 0.3]], [[0.6, 0.7]]], dtype)
    c0 = np.array([[[0.0, 0.1]], [[0.4, 0.5]]], dtype)
    y, (hn, cn) = lstm.forward(np.ones((1, 1, 2), dtype), (h0, c0))
    np.testing.assert_allclose(y[0, 0], [0.70230919, 0.72581059], rtol=1e-6)
    np.testing.assert_allclose(cn[0, 0], [0.8020075, 0.89599884], rtol=1e-6)
    np.testing.assert_allclose(hn[0, 0], [0.56668288, 0.60858738], rtol=1e-6)
    np.testing.assert_allclose(cn[1, 0], [1.17500675, 1.26892781], rtol=1e-6)
    np.testing.assert_allclose(hn[1, 0], [0.70230919, 0.72581059], rtol=1e-6)


def test_tensorflow_section1_in_both_directions():
    """One step: the fw and bw cells each see x once, so both give TensorFlow's section-1 values."""
    k, b = np.full((3 + 2, 8), 0.5), np.full(8, 0.5)
    lstm = from_tf_bidirectional([k], [k.copy()], [b], [b.copy()], backend="numpy")
    assert lstm.bidirectional and lstm.dtype.name == "float64"
    h0 = np.tile([0.2, 0.3], (2, 1, 1))
    c0 = np.tile([0.0, 0.1], (2, 1, 1))
    y, (hn, cn) = lstm.forward(np.ones((1, 1, 3)), (h0, c0))
    for d in range(2):
        np.testing.assert_allclose(hn[d, 0], [0.64121795, 0.68166804], rtol=1e-6)
        np.testing.assert_allclose(cn[d, 0], [0.88477188, 0.98103917], rtol=1e-6)
    np.testing.assert_allclose(y[0, 0], [0.64121795, 0.68166804] * 2, rtol=1e-6)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_from_tf_bidirectional_equals_composed_unidirectional_cells(rng, layer_norm):
    """stack_bidirectional_dynamic_rnn semantics: fw cell on x, bw cell on x reversed within each
    length, layer k+1 reads concat([fw, bw]); built here from single-direction from_tf models."""
    D, H, T, B = 3, 4, 5, 3
    lengths = [5, 2, 4]
    norms = lambda: {n: (rng.uniform(0.5, 1.5, H), rng.normal(0, 0.3, H))
                     for n in ("input", "transform", "forget", "output", "state")}
    kf = [rng.standard_normal((D + H, 4 * H)), rng.standard_normal((2 * H + H, 4 * H))]
    kb = [rng.standard_normal((D + H, 4 * H)), rng.standard_normal((2 * H + H, 4 * H))]
    bf = [rng.standard_normal(4 * H) for _ in range(2)]
    bb = [rng.standard_normal(4 * H) for _ in range(2)]
    lnf, lnb = ([norms(), norms()], [norms(), norms()]) if layer_norm else (None, None)
    model = from_tf_bidirectional(kf, kb, None if layer_norm else bf, None if layer_norm else bb,
                                  forget_bias=0.8, layer_norm=lnf, layer_norm_bw=lnb, backend="numpy")
    x = rng.standard_normal((T, B, D))
    y, (hn, cn) = model.forward(x, lengths=lengths)

    def cellrun(kern, bias, ln, inp, reverse):
        m = from_tf([kern], [None if layer_norm else bias], forget_bias=0.8,
                    layer_norm=None if ln is None else [ln], backend="numpy")
        out = np.zeros((T, B, H))
        hs, cs = [], []
        for b, L in enumerate(lengths):
            seq = inp[:L, b:b + 1]
            o, (h, c) = m.forward(seq[::-1] if reverse else seq)
            out[:L, b] = (o[::-1] if reverse else o)[:, 0]
            hs.append(h[0, 0])
            cs.append(c[0, 0])
        return out, np.array(hs), np.array(cs)

    inp = x
    for k in range(2):
        of, hf, cf = cellrun(kf[k], bf[k], None if lnf is None else lnf[k], inp, False)
        ob, hb, cb = cellrun(kb[k], bb[k], None if lnb is None else lnb[k], inp, True)
        for d, (h, c) in enumerate(((hf, cf), (hb, cb))):
            assert scaled_error(hn[2 * k + d], h) < 1e-12 and scaled_error(cn[2 * k + d], c) < 1e-12
        inp = np.concatenate([of, ob], axis=-1)
    assert scaled_error(y, inp) < 1e-12


def test_from_tf_bidirectional_bad_input():
    k, b = np.full((5, 8), 0.5), np.full(8, 0.5)
    with pytest.raises(InputError, match="backward kernels"):
        from_tf_bidirectional([k, k], [k], [b, b], [b])
    with pytest.raises(InputError, match="biases_bw"):
        from_tf_bidirectional([k], [k], [b], None)
    with pytest.raises(InputError, match="together"):
        from_tf_bidirectional([k], [k], layer_norm=[{}])
    with pytest.raises(InputError, match="shape"):
        from_tf_bidirectional([k, k], [k, k], [b, b], [b, b])     # layer 1 must be [2H+H, 4H]


# -- torch round trips for every architecture -------------------------------------------------------
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("bidir", [False, True])
def test_torch_state_dict_round_trip(layers, bidir, rng):
    """to_torch_state_dict of a native model (forget_bias 1) loaded into torch.nn.LSTM computes
    our function; from_torch of that module gives back our parameters."""
    torch = pytest.importorskip("torch", reason="torch is not installed; the round trip needs it (pip install torch)")
    ours = LSTM(3, 4, num_layers=layers, bidirectional=bidir, dtype="float64", seed=3, backend="numpy")
    ref = torch.nn.LSTM(3, 4, num_layers=layers, bidirectional=bidir).double()
    sd = xlstm.interop.to_torch_state_dict(ours)
    assert set(sd) == set(ref.state_dict())
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    x = rng.standard_normal((5, 2, 3))
    y, (hn, cn) = ours.forward(x)
    yt, (hnt, cnt) = ref(torch.from_numpy(x))
    for a, b in ((y, yt), (hn, hnt), (cn, cnt)):
        assert scaled_error(a, b.detach().numpy()) < 1e-12
    back = xlstm.interop.from_torch(ref)
    y2, _ = back.forward(x)
    assert scaled_error(y2, y) < 1e-12
    for k, v in ours.params.items():
        if not k.endswith(".b"):                   # b moves the forget bias constant into itself
            np.testing.assert_array_equal(back.params[k], v)


# -- recurrent dropout ----------------------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [False, True])
def test_recurrent_dropout_eval_equals_no_dropout(rng, layer_norm):
    x = rng.standard_normal((6, 3, 3))
    drop = LSTM(3, 4, num_layers=2, layer_norm=layer_norm, recurrent_dropout=0.5, dtype="float64", seed=1, backend="numpy")
    plain = LSTM(3, 4, num_layers=2, layer_norm=layer_norm, dtype="float64", seed=1, backend="numpy")
    plain.load_state_dict(drop.state_dict())
    y_train, _ = drop.forward(x)
    y_eval, _ = drop.eval().forward(x)
    y_plain, _ = plain.forward(x)
    np.testing.assert_array_equal(y_eval, y_plain)
    assert scaled_error(y_train, y_plain) > 1e-3            # training really drops


def test_recurrent_dropout_masks_reproducible_and_scaled(rng):
    x = rng.standard_normal((50, 8, 3))
    a = LSTM(3, 16, recurrent_dropout=0.25, dtype="float64", seed=5, backend="numpy")
    b = LSTM(3, 16, recurrent_dropout=0.25, dtype="float64", seed=5, backend="numpy")
    c = LSTM(3, 16, recurrent_dropout=0.25, dtype="float64", seed=6, backend="numpy")
    c.load_state_dict(a.state_dict())
    ya, _ = a.forward(x)
    yb, _ = b.forward(x)
    yc, _ = c.forward(x)
    np.testing.assert_array_equal(ya, yb)
    assert scaled_error(ya, yc) > 1e-3
    zc, zh, gm = a.last_masks[(0, 0)]
    assert zc is None and zh is None
    assert set(np.unique(gm)) == {0.0, 1 / 0.75}           # inverted dropout keeps the expectation
    assert abs(float((gm == 0).mean()) - 0.25) < 0.02
    ya2, _ = a.forward(x)                                   # a new draw on the next call
    assert scaled_error(ya, ya2) > 1e-3
    y_again, _ = a.forward(x, masks=a.last_masks)
    np.testing.assert_array_equal(y_again, ya2)


def test_recurrent_dropout_applies_to_g_only(rng):
    """Reference: c = f*c_prev + i*(g*mask); the candidate alone is dropped, with fixed masks."""
    from xlstm.cell import pointwise_forward

    lstm = LSTM(3, 4, recurrent_dropout=0.5, dtype="float64", seed=2, backend="numpy")
    x = rng.standard_normal((4, 2, 3))
    y, _ = lstm.forward(x)
    gm = lstm.last_masks[(0, 0)][2]
    P = lstm.state_dict()
    h = c = np.zeros((2, 4))
    for t in range(4):
        _, c, h = pointwise_forward(x[t] @ P["l0.W"] + h @ P["l0.U"] + P["l0.b"], c, h, 1.0, gmask=gm[t])
        assert scaled_error(y[t], h) < 1e-12


# -- zoneout --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [False, True])
def test_zoneout_eval_uses_the_expectation(rng, layer_norm):
    """Evaluation: c = p*c_prev + (1-p)*c_new, h likewise (written out here with a plain model
    whose step output we mix by hand)."""
    p = 0.3
    x = rng.standard_normal((5, 2, 3))
    zo = LSTM(3, 4, layer_norm=layer_norm, zoneout=p, dtype="float64", seed=4, backend="numpy").eval()
    cell = LSTM(3, 4, layer_norm=layer_norm, dtype="float64", seed=4, backend="numpy")
    cell.load_state_dict(zo.state_dict())
    y, (hn, cn) = zo.forward(x)
    h, c = np.zeros((1, 2, 4)), np.zeros((1, 2, 4))
    for t in range(5):
        _, (h_new, c_new) = cell.forward(x[t:t + 1], (h, c))      # one step from the mixed state
        h, c = p * h + (1 - p) * h_new, p * c + (1 - p) * c_new
        assert scaled_error(y[t], h[0]) < 1e-12
    assert scaled_error(cn, c) < 1e-12 and scaled_error(hn, h) < 1e-12


def test_zoneout_training_masks_are_binary_and_reproducible(rng):
    x = rng.standard_normal((30, 4, 3))
    a = LSTM(3, 8, zoneout=0.4, dtype="float64", seed=9, backend="numpy")
    b = LSTM(3, 8, zoneout=0.4, dtype="float64", seed=9, backend="numpy")
    np.testing.assert_array_equal(a.forward(x)[0], b.forward(x)[0])
    zc, zh, gm = a.last_masks[(0, 0)]
    assert gm is None and set(np.unique(zc)) == {0.0, 1.0} and set(np.unique(zh)) == {0.0, 1.0}
    assert not np.array_equal(zc, zh)                            # c and h zone out independently
    assert abs(float(zc.mean()) - 0.4) < 0.03


# -- variable lengths -----------------------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, False), (2, True)])
def test_lengths_equal_truncated_runs(rng, layer_norm, layers, bidir):
    T, B, D, H = 6, 4, 3, 5
    lengths = [6, 2, 5, 1]
    lstm = LSTM(D, H, num_layers=layers, bidirectional=bidir, layer_norm=layer_norm, dtype="float64",
                seed=0, backend="numpy")
    S = layers * lstm.num_directions
    x = rng.standard_normal((T, B, D))
    h0, c0 = rng.standard_normal((S, B, H)), rng.standard_normal((S, B, H))
    y, (hn, cn) = lstm.forward(x, (h0, c0), lengths=lengths)
    for b, L in enumerate(lengths):
        assert np.all(y[L:, b] == 0.0)                          # outputs past the end are zero
        yb, (hb, cb) = lstm.forward(x[:L, b:b + 1], (h0[:, b:b + 1], c0[:, b:b + 1]))
        assert scaled_error(y[:L, b], yb[:, 0]) < 1e-12
        assert scaled_error(hn[:, b], hb[:, 0]) < 1e-12 and scaled_error(cn[:, b], cb[:, 0]) < 1e-12


def test_lengths_no_gradient_from_padding(rng):
    lstm = LSTM(3, 4, bidirectional=True, dtype="float64", seed=0, backend="numpy")
    x = rng.standard_normal((5, 2, 3))
    y, _ = lstm.forward(x, lengths=[5, 3])
    dx, _ = lstm.backward(rng.standard_normal(y.shape))
    assert np.all(dx[3:, 1] == 0.0) and np.all(dx[:, 0] != 0.0)


@pytest.mark.parametrize("bidir", [False, True])
def test_gradcheck_lengths_plain(rng, bidir):
    lstm = LSTM(3, 4, num_layers=2, bidirectional=bidir, dtype="float64", seed=0, backend="numpy")
    report = gradcheck_lstm(lstm, rng.standard_normal((5, 3, 3)), lengths=[5, 1, 3], tol=1e-6)
    assert report.ok, report


@pytest.mark.parametrize("kw", [dict(recurrent_dropout=0.4), dict(zoneout=0.3),
                                dict(recurrent_dropout=0.3, zoneout=0.2, bidirectional=True)])
def test_gradcheck_fixed_masks_plain(rng, kw):
    lstm = LSTM(3, 4, dtype="float64", seed=0, backend="numpy", **kw)
    report = gradcheck_lstm(lstm, rng.standard_normal((5, 3, 3)), lengths=[5, 4, 2], tol=1e-6)
    assert report.ok, report


@pytest.mark.parametrize("lengths,word", [
    ([0, 3, 2], "1 <= length"),
    ([4, 3, 5], "1 <= length"),
    ([-1, 3, 2], "1 <= length"),
    ([3, 2], "shape"),
    ([[3, 2, 1]], "shape"),
    ([2.5, 3, 1], "integers"),
    (np.array([2.0, np.nan, 1.0]), "integers"),
    (["a", "b", "c"], "integers"),
])
def test_bad_lengths_raise(lengths, word):
    lstm = LSTM(3, 4, backend="numpy")
    with pytest.raises(InputError, match=word):
        lstm.forward(np.zeros((4, 3, 3), "float32"), lengths=lengths)


def test_integral_float_lengths_are_accepted(rng):
    lstm = LSTM(3, 4, dtype="float64", seed=0, backend="numpy")
    x = rng.standard_normal((4, 3, 3))
    np.testing.assert_array_equal(lstm.forward(x, lengths=[4.0, 2.0, 1.0])[0], lstm.forward(x, lengths=[4, 2, 1])[0])
