"""The LayerNorm LSTM (TensorFlow's LayerNormBasicLSTMCell): layer norm op, fused step vs the
readable reference, an independent re-implementation, finite differences, torch autograd."""
import numpy as np
import pytest

import xlstm
from xlstm import InputError, LSTM
from xlstm.backends import get_backend
from xlstm.gradcheck import gradcheck_lstm, numerical_grad, scaled_error
from xlstm.layernorm import (layer_norm_backward, layer_norm_forward, ln_cell_backward, ln_cell_forward,
                             tf_layer_norm_params)

LN_PARAMS = ("ln_gain", "ln_shift", "ln_c_gain", "ln_c_shift")


def _ln_model(D=3, H=4, seed=0, **kw):
    """A float64 LN LSTM with gains/shifts moved off 1/0 so their gradients are all exercised."""
    lstm = LSTM(D, H, layer_norm=True, dtype="float64", seed=seed, backend="numpy", **kw)
    rng = np.random.default_rng(seed + 100)
    for name, p in lstm.params.items():
        if name.endswith("gain"):
            p[...] = rng.uniform(0.5, 1.5, p.shape)
        elif name.endswith("shift"):
            p[...] = rng.normal(0.0, 0.3, p.shape)
    return lstm


# -- the layer norm op ---------------------------------------------------------------------
def test_layer_norm_forward_against_written_out_mean_and_var(rng):
    v = rng.standard_normal((5, 7)) * 3 + 1
    gain, shift = rng.uniform(0.5, 2, 7), rng.standard_normal(7)
    y, vhat, rstd = layer_norm_forward(v, gain, shift, eps=1e-5)
    for b in range(5):
        row = v[b]
        mean = sum(row) / len(row)
        var = sum((e - mean) ** 2 for e in row) / len(row)           # biased, as TensorFlow
        expect = [(e - mean) / np.sqrt(var + 1e-5) * g + s for e, g, s in zip(row, gain, shift)]
        np.testing.assert_allclose(y[b], expect, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(vhat.mean(axis=-1), 0, atol=1e-12)
    np.testing.assert_allclose((vhat ** 2).mean(axis=-1), 1 - 1e-5 * rstd[:, 0] ** 2, rtol=1e-10)


def test_layer_norm_backward_finite_differences(rng):
    v = rng.standard_normal((4, 6))
    gain, shift = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    R = rng.standard_normal((4, 6))

    def loss():
        return float((layer_norm_forward(v, gain, shift, 1e-12)[0] * R).sum())

    _, vhat, rstd = layer_norm_forward(v, gain, shift, 1e-12)
    dv, dgain, dshift = layer_norm_backward(R, vhat, rstd, gain)
    for a, g in ((v, dv), (gain, dgain), (shift, dshift)):
        _, num = numerical_grad(loss, a, eps=1e-6)
        assert scaled_error(num, g.reshape(-1)) < 1e-8


def test_layer_norm_backward_per_gate_gain_shapes(rng):
    """[B,4,H] with gain [4,H]: dgain sums over the batch only (one gradient per gate unit)."""
    v = rng.standard_normal((3, 4, 5))
    gain = rng.uniform(0.5, 2, (4, 5))
    dy = rng.standard_normal((3, 4, 5))
    _, vhat, rstd = layer_norm_forward(v, gain, np.zeros((4, 5)))
    _, dgain, dshift = layer_norm_backward(dy, vhat, rstd, gain)
    assert dgain.shape == dshift.shape == (4, 5)
    np.testing.assert_allclose(dgain, (dy * vhat).sum(axis=0))


# -- fused backend step vs the readable reference -------------------------------------------------
def _random_step(rng, B, H, dtype, variant):
    z = rng.standard_normal((B, 4 * H)) * 2
    c_prev, h_prev = rng.standard_normal((B, H)), rng.standard_normal((B, H)) * 0.5
    gain, shift = rng.uniform(0.5, 1.5, 4 * H), rng.normal(0, 0.3, 4 * H)
    c_gain, c_shift = rng.uniform(0.5, 1.5, H), rng.normal(0, 0.3, H)
    mask = zc = zh = gm = None
    if variant in ("mask", "all"):
        mask = (rng.random(B) < 0.6).astype(float)
    if variant in ("zoneout", "all"):
        zc, zh = (rng.random((B, H)) < 0.3).astype(float), (rng.random((B, H)) < 0.3).astype(float)
    if variant in ("dropout", "all"):
        gm = (rng.random((B, H)) < 0.7) / 0.7
    cast = lambda a: None if a is None else np.asarray(a, dtype)
    return [cast(a) for a in (z, c_prev, h_prev, gain, shift, c_gain, c_shift, mask, zc, zh, gm)]


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("variant", ["plain", "mask", "zoneout", "dropout", "all"])
def test_fused_step_matches_reference(dtype, tol, variant):
    rng = np.random.default_rng(7)
    B, H = 5, 6
    z, c_prev, h_prev, gain, shift, c_gain, c_shift, mask, zc, zh, gm = _random_step(rng, B, H, dtype, variant)
    be = get_backend()
    ref = ln_cell_forward(z.astype(np.float64), c_prev, h_prev, gain, shift, c_gain, c_shift, 1.0, 1e-12,
                          mask, zc, zh, gm)
    zbuf = z.copy()
    zhat, chat = np.empty_like(z), np.empty_like(c_prev)
    rstd, rstd_c = np.empty((B, 4), dtype), np.empty(B, dtype)
    c, h = np.empty_like(c_prev), np.empty_like(c_prev)
    be.ln_lstm_forward_step(zbuf, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain, shift,
                            c_gain, c_shift, 1.0, 1e-12, mask, zc, zh, gm)
    for got, want in ((zbuf, ref["gates"]), (zhat, ref["zhat"]), (rstd, ref["rstd"]), (chat, ref["chat"]),
                      (rstd_c, ref["rstd_c"][:, 0]), (c, ref["c"]), (h, ref["h"])):
        assert scaled_error(got, want) < tol

    dy, dh_next, dc_next = (rng.standard_normal((B, H)).astype(dtype) for _ in range(3))
    rb = ln_cell_backward(ref, c_prev, gain, c_gain, dy, dh_next, dc_next, mask, zc, zh, gm)
    dz, dc_prev, dh_skip = np.empty_like(z), np.empty_like(c_prev), np.empty_like(c_prev)
    acc = [np.full(4 * H, 0.25, dtype), np.full(4 * H, 0.25, dtype), np.full(H, 0.25, dtype), np.full(H, 0.25, dtype)]
    be.ln_lstm_backward_step(zbuf, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift, dy, dh_next,
                             dc_next, dz, dc_prev, dh_skip, *acc, mask, zc, zh, gm)
    for got, want in ((dz, rb["dz"]), (dc_prev, rb["dc_prev"]), (dh_skip, rb["dh_skip"]),
                      (acc[0] - 0.25, rb["dgain"]), (acc[1] - 0.25, rb["dshift"]),
                      (acc[2] - 0.25, rb["dc_gain"]), (acc[3] - 0.25, rb["dc_shift"])):
        assert scaled_error(got, want) < tol * 10


def test_fused_backward_step_with_aliased_outputs(rng):
    """The layer passes dc_prev=dc_next and dh_skip=dh_next (in place); results must not change."""
    B, H = 3, 4
    z, c_prev, h_prev, gain, shift, c_gain, c_shift, mask, zc, zh, gm = _random_step(rng, B, H, "float64", "all")
    f = ln_cell_forward(z, c_prev, h_prev, gain, shift, c_gain, c_shift, 1.0, 1e-12, mask, zc, zh, gm)
    dy, dh, dc = (rng.standard_normal((B, H)) for _ in range(3))
    rb = ln_cell_backward(f, c_prev, gain, c_gain, dy, dh, dc, mask, zc, zh, gm)
    acc = [np.zeros(4 * H), np.zeros(4 * H), np.zeros(H), np.zeros(H)]
    dz = np.empty((B, 4 * H))
    get_backend().ln_lstm_backward_step(f["gates"], f["zhat"], f["rstd"], f["chat"], f["rstd_c"][:, 0], c_prev,
                                        gain, c_gain, c_shift, dy, dh, dc, dz, dc, dh, *acc, mask, zc, zh, gm)
    assert scaled_error(dc, rb["dc_prev"]) < 1e-12
    assert scaled_error(dh, rb["dh_skip"]) < 1e-12
    assert scaled_error(dz, rb["dz"]) < 1e-12


# -- the layer against an independent implementation in this file --------------------------------
def _independent_ln_lstm(lstm, x, h0, c0, lengths=None):
    """The TF LayerNormBasicLSTMCell written out with np.mean / np.var, one direction and layer."""
    P = lstm.state_dict()
    H, eps, fb = lstm.hidden_size, lstm.layer_norm_eps, lstm.forget_bias

    def ln(v, g, s):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + eps) * g + s

    sig = lambda a: 1 / (1 + np.exp(-a))
    h, c, ys = h0.copy(), c0.copy(), []
    for t in range(x.shape[0]):
        z = x[t] @ P["l0.W"] + h @ P["l0.U"]
        zs = [ln(z[:, k * H:(k + 1) * H], P["l0.ln_gain"][k * H:(k + 1) * H], P["l0.ln_shift"][k * H:(k + 1) * H])
              for k in range(4)]
        i, f, g, o = sig(zs[0]), sig(zs[1] + fb), np.tanh(zs[2]), sig(zs[3])
        c_new = ln(f * c + i * g, P["l0.ln_c_gain"], P["l0.ln_c_shift"])
        h_new = o * np.tanh(c_new)
        live = np.ones((x.shape[1], 1)) if lengths is None else (t < np.asarray(lengths))[:, None]
        c, h = np.where(live, c_new, c), np.where(live, h_new, h)
        ys.append(np.where(live, h, 0.0))
    return np.stack(ys), h, c


@pytest.mark.parametrize("lengths", [None, [5, 2, 4]])
def test_layer_matches_independent_implementation(rng, lengths):
    lstm = _ln_model(3, 4, forget_bias=0.7)
    x = rng.standard_normal((5, 3, 3))
    h0, c0 = rng.standard_normal((1, 3, 4)), rng.standard_normal((1, 3, 4))
    y, (hn, cn) = lstm.forward(x, (h0, c0), lengths=lengths)
    ye, he, ce = _independent_ln_lstm(lstm, x, h0[0], c0[0], lengths)
    assert scaled_error(y, ye) < 1e-12
    assert scaled_error(hn[0], he) < 1e-12
    assert scaled_error(cn[0], ce) < 1e-12


def test_carried_cell_state_is_normalised(rng):
    """With gain 1, shift 0 every carried c row has mean 0 and variance 1 (TensorFlow's semantics)."""
    lstm = LSTM(3, 5, layer_norm=True, dtype="float64", seed=0, backend="numpy")
    _, (_, cn) = lstm.forward(rng.standard_normal((4, 2, 3)))
    np.testing.assert_allclose(cn[0].mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(cn[0].var(-1), 1, rtol=1e-9)


def test_eps_is_used(rng):
    x = rng.standard_normal((3, 2, 3))
    a = _ln_model(3, 4, layer_norm_eps=1e-12)
    b = _ln_model(3, 4, layer_norm_eps=1.0)
    ya, _ = a.forward(x)
    yb, _ = b.forward(x)
    assert scaled_error(ya, yb) > 1e-3
    ye, _, _ = _independent_ln_lstm(b, x, np.zeros((2, 4)), np.zeros((2, 4)))
    assert scaled_error(yb, ye) < 1e-12


def test_ln_model_has_no_bias_and_float32_agrees():
    lstm = LSTM(3, 4, layer_norm=True, seed=0, backend="numpy")
    assert not any(k.endswith(".b") for k in lstm.params)
    assert all("l0." + n in lstm.params for n in LN_PARAMS)
    l64 = LSTM(3, 4, layer_norm=True, seed=0, dtype="float64", backend="numpy")
    l64.load_state_dict(lstm.state_dict())
    x = np.random.default_rng(0).standard_normal((6, 2, 3))
    y32, _ = lstm.forward(x.astype("float32"))
    y64, _ = l64.forward(x)
    dx32, _ = lstm.backward(np.ones_like(y32))
    dx64, _ = l64.backward(np.ones_like(y64))
    assert scaled_error(y32, y64) < 1e-5 and scaled_error(dx32, dx64) < 1e-4
    for k in lstm.grads:
        assert scaled_error(lstm.grads[k], l64.grads[k]) < 1e-4, k


# -- finite differences (float64) ---------------------------------------------------------------
GRADCHECK_CASES = {
    "single": dict(kw={}, lengths=None),
    "layers2_bidir_lengths": dict(kw=dict(num_layers=2, bidirectional=True), lengths=[5, 2, 4]),
    "recurrent_dropout": dict(kw=dict(recurrent_dropout=0.4), lengths=None),
    "zoneout": dict(kw=dict(zoneout=0.3), lengths=None),
    "everything": dict(kw=dict(num_layers=2, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2),
                       lengths=[3, 5, 1]),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_layer_norm(case, rng):
    c = GRADCHECK_CASES[case]
    lstm = _ln_model(3, 4, **c["kw"])
    x = rng.standard_normal((5, 3, 3))
    report = gradcheck_lstm(lstm, x, lengths=c["lengths"], tol=1e-6)
    assert report.ok, report
    want = {f"{lstm.prefix(k, d)}{n}" for k in range(lstm.num_layers) for d in range(lstm.num_directions)
            for n in LN_PARAMS + ("W", "U")} | {"x", "h0", "c0"}
    assert want <= set(report.errors)
    if c["kw"].get("recurrent_dropout") or c["kw"].get("zoneout"):
        masks = lstm.last_masks[(0, 0)]
        assert any(m is not None and 0 < float(np.mean(m == 0)) < 1 for m in masks)   # masks really used


def test_gradcheck_catches_a_wrong_ln_gradient(rng, monkeypatch):
    """Break dc_gain in the fused step: the check must fail (so the passing checks mean something)."""
    be = get_backend()
    orig = type(be).ln_lstm_backward_step

    def broken(self, *a, **k):
        orig(self, *a, **k)
        a[18][...] *= 1.01                                   # dc_shift accumulator: 1% off

    monkeypatch.setattr(type(be), "ln_lstm_backward_step", broken)
    report = gradcheck_lstm(_ln_model(3, 4), rng.standard_normal((3, 2, 3)))
    assert not report.ok and report.errors["l0.ln_c_shift"] > 1e-6


# -- TensorFlow names ---------------------------------------------------------------------------
def test_tf_layer_norm_params_order():
    H = 2
    d = {n: (np.full(H, k + 1.0), np.full(H, -(k + 1.0)))
         for k, n in enumerate(["input", "transform", "forget", "output", "state"])}
    p = tf_layer_norm_params(d, H, "l0.")
    # ours i, f, g, o = TF input, forget, transform(=j), output
    np.testing.assert_array_equal(p["l0.ln_gain"], [1, 1, 3, 3, 2, 2, 4, 4])
    np.testing.assert_array_equal(p["l0.ln_shift"], [-1, -1, -3, -3, -2, -2, -4, -4])
    np.testing.assert_array_equal(p["l0.ln_c_gain"], [5, 5])
    np.testing.assert_array_equal(p["l0.ln_c_shift"], [-5, -5])
    with pytest.raises(InputError, match="state"):
        tf_layer_norm_params({k: v for k, v in d.items() if k != "state"}, H, "l0.")
    with pytest.raises(InputError, match="shape"):
        tf_layer_norm_params(dict(d, forget=(np.ones(3), np.zeros(3))), H, "l0.")


def test_from_tf_layer_norm_builds_the_tf_cell(rng):
    """from_tf with LN norms equals the written-out TF LayerNormBasicLSTMCell on TF's layout."""
    D, H = 3, 4
    kernel = rng.standard_normal((D + H, 4 * H))
    norms = {n: (rng.uniform(0.5, 1.5, H), rng.normal(0, 0.3, H))
             for n in ("input", "transform", "forget", "output", "state")}
    lstm = xlstm.interop.from_tf([kernel], [None], layer_norm=[norms], dtype="float64", backend="numpy")
    x, h0, c0 = rng.standard_normal((1, 2, D)), rng.standard_normal((1, 2, H)), rng.standard_normal((1, 2, H))
    y, (hn, cn) = lstm.forward(x, (h0, c0))

    def ln(v, gb):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-12) * gb[0] + gb[1]

    sig = lambda a: 1 / (1 + np.exp(-a))
    zi, zj, zf, zo = np.split(np.concatenate([x[0], h0[0]], 1) @ kernel, 4, axis=1)   # TF: i, j, f, o
    c = ln(sig(ln(zf, norms["forget"]) + 1.0) * c0[0] + sig(ln(zi, norms["input"])) * np.tanh(ln(zj, norms["transform"])),
           norms["state"])
    h = sig(ln(zo, norms["output"])) * np.tanh(c)
    assert scaled_error(cn[0], c) < 1e-12 and scaled_error(hn[0], h) < 1e-12


# -- torch autograd -----------------------------------------------------------------------------
def _torch_ln_lstm(torch, x, h0, c0, P, layers, H, forget_bias, eps):
    """The same cell in torch ops (F.layer_norm per gate), autograd does the backward."""
    F = torch.nn.functional
    inp, hs, cs = x, [], []
    for k in range(layers):
        p = f"l{k}."
        h, c, ys = h0[k], c0[k], []
        for t in range(inp.shape[0]):
            z = inp[t] @ P[p + "W"] + h @ P[p + "U"]
            zn = [F.layer_norm(z[:, j * H:(j + 1) * H], (H,), P[p + "ln_gain"][j * H:(j + 1) * H],
                               P[p + "ln_shift"][j * H:(j + 1) * H], eps) for j in range(4)]
            i, f, g, o = torch.sigmoid(zn[0]), torch.sigmoid(zn[1] + forget_bias), torch.tanh(zn[2]), torch.sigmoid(zn[3])
            c = F.layer_norm(f * c + i * g, (H,), P[p + "ln_c_gain"], P[p + "ln_c_shift"], eps)
            h = o * torch.tanh(c)
            ys.append(h)
        inp = torch.stack(ys)
        hs.append(h)
        cs.append(c)
    return inp, torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("layers", [1, 2])
def test_torch_autograd_parity_float64(layers, rng):
    torch = pytest.importorskip("torch", reason="torch is not installed; this parity test needs it (pip install torch)")
    T, B, D, H = 4, 3, 3, 5
    lstm = _ln_model(D, H, num_layers=layers, forget_bias=1.0)
    x = rng.standard_normal((T, B, D))
    h0, c0 = rng.standard_normal((layers, B, H)), rng.standard_normal((layers, B, H))
    dy, dhn, dcn = rng.standard_normal((T, B, H)), rng.standard_normal((layers, B, H)), rng.standard_normal((layers, B, H))
    y, (hn, cn) = lstm.forward(x, (h0, c0))
    dx, (dh0, dc0) = lstm.backward(dy, (dhn, dcn))

    P = {k: torch.tensor(v, requires_grad=True) for k, v in lstm.state_dict().items()}
    xt, h0t, c0t = (torch.tensor(a, requires_grad=True) for a in (x, h0, c0))
    yt, hnt, cnt = _torch_ln_lstm(torch, xt, h0t, c0t, P, layers, H, 1.0, lstm.layer_norm_eps)
    ((yt * torch.tensor(dy)).sum() + (hnt * torch.tensor(dhn)).sum() + (cnt * torch.tensor(dcn)).sum()).backward()
    errs = {"y": scaled_error(y, yt.detach().numpy()), "h_n": scaled_error(hn, hnt.detach().numpy()),
            "c_n": scaled_error(cn, cnt.detach().numpy()), "dx": scaled_error(dx, xt.grad.numpy()),
            "dh0": scaled_error(dh0, h0t.grad.numpy()), "dc0": scaled_error(dc0, c0t.grad.numpy())}
    errs.update({k: scaled_error(lstm.grads[k], P[k].grad.numpy()) for k in lstm.grads})
    assert len(errs) == 6 + 6 * layers
    assert max(errs.values()) < 1e-9, errs
