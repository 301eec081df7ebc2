"""Comparisons shared by the emulated (stand-in cupy) and the GPU tests of the CuPy backend."""
from __future__ import annotations

import numpy as np

import xlstm
from xlstm.backends import NumpyBackend

TOL = {"float64": 1e-10, "float32": 1e-5}


def normwise(a, b) -> float:
    """max|a-b| / max|b| (max|a-b| when b is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def assert_close(what, got, want, dtype, tol=None):
    dtype = np.dtype(dtype).name
    tol = TOL[dtype] if tol is None else tol[dtype]
    e = normwise(got, want)
    assert e <= tol, f"{what} ({dtype}): normwise error {e:.3g} > {tol:g}"


# -- shared by the emulated and the GPU tests -------------------------------------------------
MODS = ["plain", "mask", "zoneout", "dropout", "all"]


def step_inputs(rng, B, H, dt, kind):
    z = (rng.standard_normal((B, 4 * H)) * 2).astype(dt)
    c_prev = (rng.standard_normal((B, H)) * 2).astype(dt)
    h_prev = rng.uniform(-1, 1, (B, H)).astype(dt)
    mask = zc = zh = gm = None
    if kind in ("mask", "all"):
        mask = (rng.random(B) < 0.5).astype(dt)
        mask[0] = 0
    if kind in ("zoneout", "all"):
        zc = (rng.random((B, H)) < 0.3).astype(dt)
        zh = (rng.random((B, H)) < 0.3).astype(dt)
    if kind in ("dropout", "all"):
        gm = ((rng.random((B, H)) < 0.75) / 0.75).astype(dt)
    grads = tuple(rng.standard_normal((B, H)).astype(dt) for _ in range(3))
    return z, c_prev, h_prev, (mask, zc, zh, gm), grads


def compare_steps(be, dt, B, H, kind, seed=0):
    """Plain and LayerNorm steps, forward and backward, on ``be`` against NumpyBackend."""
    rng = np.random.default_rng([seed, B, H, MODS.index(kind)])
    nb = NumpyBackend()
    z, c_prev, h_prev, mods, (dy, dh_next, dc_next) = step_inputs(rng, B, H, dt, kind)
    on = lambda *arrays: [None if a is None else be.asarray(a) for a in arrays]  # noqa: E731
    back = be.to_numpy
    dmods = on(*mods)

    # plain forward
    zn, cn, hn = z.copy(), np.empty_like(c_prev), np.empty_like(h_prev)
    nb.lstm_forward_step(zn, c_prev, h_prev, cn, hn, 1.0, *mods)
    zd, cpd, hpd = on(z, c_prev, h_prev)
    cd, hd = be.xp.empty((B, H), dt), be.xp.empty((B, H), dt)
    be.lstm_forward_step(zd, cpd, hpd, cd, hd, 1.0, *dmods)
    for what, g, w in (("gates", zd, zn), ("c", cd, cn), ("h", hd, hn)):
        assert_close(f"forward {what} [{kind}]", back(g), w, dt)

    # plain backward, with the layer's aliasing (dc_prev is dc_next, dh_skip is dh_next)
    gates = zn
    dzn, dcn, dhn = np.empty_like(z), dc_next.copy(), dh_next.copy()
    nb.lstm_backward_step(gates, c_prev, dy, dhn, dcn, dzn, dcn, dhn, *mods)
    gd, dyd, dhd, dcd = on(gates, dy, dh_next, dc_next)
    dzd = be.xp.empty((B, 4 * H), dt)
    be.lstm_backward_step(gd, cpd, dyd, dhd, dcd, dzd, dcd, dhd, *dmods)
    for what, g, w in (("dz", dzd, dzn), ("dc_prev", dcd, dcn), ("dh_skip", dhd, dhn)):
        assert_close(f"backward {what} [{kind}]", back(g), w, dt)

    # LayerNorm forward and backward (accumulators start non-zero: the step adds)
    gain = (1 + 0.3 * rng.standard_normal(4 * H)).astype(dt)
    shift = (0.2 * rng.standard_normal(4 * H)).astype(dt)
    c_gain = (1 + 0.3 * rng.standard_normal(H)).astype(dt)
    c_shift = (0.2 * rng.standard_normal(H)).astype(dt)
    eps = 1e-5
    outs_n = [z.copy(), np.empty_like(z), np.empty((B, 4), dt), np.empty_like(c_prev), np.empty(B, dt),
              np.empty_like(c_prev), np.empty_like(c_prev)]
    nb.ln_lstm_forward_step(outs_n[0], outs_n[1], outs_n[2], outs_n[3], outs_n[4], c_prev, h_prev,
                            outs_n[5], outs_n[6], gain, shift, c_gain, c_shift, 1.0, eps, *mods)
    outs_d = on(z) + [be.xp.empty(o.shape, dt) for o in outs_n[1:]]
    pd = on(gain, shift, c_gain, c_shift)
    be.ln_lstm_forward_step(outs_d[0], outs_d[1], outs_d[2], outs_d[3], outs_d[4], cpd, hpd,
                            outs_d[5], outs_d[6], *pd, 1.0, eps, *dmods)
    for what, g, w in zip(("gates", "zhat", "rstd", "chat", "rstd_c", "c", "h"), outs_d, outs_n):
        assert_close(f"LN forward {what} [{kind}]", back(g), w, dt)

    acc0 = [rng.standard_normal(n).astype(dt) for n in (4 * H, 4 * H, H, H)]
    accn = [a.copy() for a in acc0]
    dzn, dcn, dhn = np.empty_like(z), dc_next.copy(), dh_next.copy()
    g_n, zh_n, rs_n, ch_n, rc_n = outs_n[:5]
    nb.ln_lstm_backward_step(g_n, zh_n, rs_n, ch_n, rc_n, c_prev, gain, c_gain, c_shift, dy, dhn,
                             dcn, dzn, dcn, dhn, *accn, *mods)
    accd = on(*acc0)
    dhd, dcd = on(dh_next, dc_next)
    dzd = be.xp.empty((B, 4 * H), dt)
    stored = on(g_n, zh_n, rs_n, ch_n, rc_n)
    be.ln_lstm_backward_step(*stored, cpd, pd[0], pd[2], pd[3], dyd, dhd, dcd, dzd, dcd, dhd,
                             *accd, *dmods)
    for what, g, w in zip(("dz", "dc_prev", "dh_skip", "dgain", "dshift", "dc_gain", "dc_shift"),
                          [dzd, dcd, dhd, *accd], [dzn, dcn, dhn, *accn]):
        assert_close(f"LN backward {what} [{kind}]", back(g), w, dt)


# Full-model configurations: (name, LSTM keyword arguments, use lengths)
CONFIGS = [
    ("1 layer", dict(num_layers=1), False),
    ("2 layers", dict(num_layers=2), False),
    ("bidirectional", dict(num_layers=1, bidirectional=True), False),
    ("2 layers bidirectional lengths", dict(num_layers=2, bidirectional=True), True),
    ("zoneout + recurrent dropout, lengths", dict(num_layers=2, bidirectional=True, zoneout=0.2,
                                                  recurrent_dropout=0.25), True),
    ("layer norm", dict(num_layers=1, layer_norm=True), False),
    ("layer norm 2 layers bidirectional, zoneout + dropout, lengths",
     dict(num_layers=2, bidirectional=True, layer_norm=True, zoneout=0.15, recurrent_dropout=0.2), True),
]
CONFIG_IDS = [c[0].replace(" ", "_").replace(",", "") for c in CONFIGS]


def compare_models(backend, dtype, kwargs, use_lengths, T=6, B=3, D=5, H=33, seed=5):
    """A model on NumPy and its copy on ``backend``: every output, state, dx and gradient."""
    rng = np.random.default_rng(seed)
    ref = xlstm.LSTM(D, H, dtype=dtype, seed=seed, backend="numpy", **kwargs)
    dev = xlstm.LSTM(D, H, dtype=dtype, seed=seed, backend=backend, **kwargs)
    dev.load_state_dict(ref.state_dict())
    S = (ref.num_layers * ref.num_directions, B, H)
    x = rng.standard_normal((T, B, D)).astype(dtype)
    h0, c0 = (rng.standard_normal(S).astype(dtype) * 0.5 for _ in range(2))
    lengths = np.array([T, max(1, T - 2), 1][:B]) if use_lengths else None
    dirs = ref.num_directions
    dy = rng.standard_normal((T, B, H * dirs)).astype(dtype)
    dhn, dcn = (rng.standard_normal(S).astype(dtype) for _ in range(2))

    y, (hn, cn) = ref.forward(x, state=(h0, c0), lengths=lengths)
    be = dev.backend
    masks = {k: tuple(None if m is None else be.asarray(ref.backend.to_numpy(m)) for m in v)
             for k, v in ref.last_masks.items()}          # the very masks the NumPy run drew
    y2, (hn2, cn2) = dev.forward(be.asarray(x), state=(be.asarray(h0), be.asarray(c0)),
                                 lengths=lengths, masks=masks)
    dx, (dh0, dc0) = ref.backward(dy, dstate=(dhn, dcn))
    dx2, (dh02, dc02) = dev.backward(be.asarray(dy), dstate=(be.asarray(dhn), be.asarray(dcn)))
    be.synchronize()
    for what, g, w in (("y", y2, y), ("h_n", hn2, hn), ("c_n", cn2, cn), ("dx", dx2, dx),
                       ("dh0", dh02, dh0), ("dc0", dc02, dc0)):
        assert_close(what, be.to_numpy(g), w, dtype)
    assert set(dev.grads) == set(ref.grads)
    for k in ref.grads:
        assert_close(f"grad {k}", be.to_numpy(dev.grads[k]), ref.grads[k], dtype)
