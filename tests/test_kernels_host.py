"""The CUDA pointwise math, compiled for the host, against the NumPy references.

``xlstm/kernels/lstm_pointwise.cuh`` is compiled with g++ through ``tests/support/kernels_host_shim.cpp``
(which runs the kernels' per-element code over every element, as one launch does) and loaded
with ctypes. Its results must match ``NumpyBackend`` (the in-place reference) and
``xlstm.cell`` (the readable reference) on random inputs, extreme inputs (|z| up to 1e4, |c| up
to 1e3), masks with finished rows, zoneout (Bernoulli and expected fractions) and recurrent
dropout, per dtype: float64 to 1e-12, float32 to 1e-6, normwise max|a-b| / max(max|b|, 1).
The LayerNorm LSTM step (row functions with the row sums done by one serial worker instead of
a thread block, then the column sums of the parameter gradients) is held to
``NumpyBackend.ln_lstm_*_step`` and ``xlstm.layernorm.ln_cell_*`` the same way.
This is how CI checks the CUDA math without a GPU (see DESIGN.md at the repository root).
"""
from __future__ import annotations

import numpy as np
import pytest

from support.kernels_host import SUFFIX, TOL, check, err
from support.kernels_host import ptr as _ptr
from xlstm import cell
from xlstm.backends.numpy_backend import NumpyBackend



@pytest.fixture(scope="module")
def lib(host_lib):
    return host_lib


def host_forward(lib, z, c_prev, h_prev, forget_bias, mask=None, zc=None, zh=None, gmask=None):
    """Runs the kernel's forward over a copy of z. Returns (gates, c, h)."""
    dt = z.dtype.type
    B, H = c_prev.shape
    gates = z.copy()
    c, h = np.full_like(c_prev, np.nan), np.full_like(h_prev, np.nan)
    getattr(lib, f"host_lstm_forward_step_{SUFFIX[dt]}")(
        _ptr(gates), _ptr(c_prev), _ptr(h_prev), _ptr(c), _ptr(h), dt(forget_bias),
        _ptr(mask), _ptr(zc), _ptr(zh), _ptr(gmask), B, H)
    return gates, c, h


def host_backward(lib, gates, c_prev, dy, dh_next, dc_next, mask=None, zc=None, zh=None,
                  gmask=None, alias=False):
    """Runs the kernel's backward. Returns (dz, dc_prev, dh_skip).

    alias=True writes dc_prev over a copy of dc_next and dh_skip over a copy of dh_next, as
    the layer does.
    """
    dt = gates.dtype.type
    B, H = c_prev.shape
    dz = np.full_like(gates, np.nan)
    if alias:
        dc_prev, dh_skip = dc_next.copy(), dh_next.copy()
        dc_in, dh_in = dc_prev, dh_skip
    else:
        dc_prev, dh_skip = np.full_like(c_prev, np.nan), np.full_like(c_prev, np.nan)
        dc_in, dh_in = dc_next, dh_next
    getattr(lib, f"host_lstm_backward_step_{SUFFIX[dt]}")(
        _ptr(gates), _ptr(c_prev), _ptr(dy), _ptr(dh_in), _ptr(dc_in), _ptr(dz), _ptr(dc_prev),
        _ptr(dh_skip), _ptr(mask), _ptr(zc), _ptr(zh), _ptr(gmask), B, H)
    return dz, dc_prev, dh_skip


def check_ill_conditioned(what, got, refs, truth):
    """float32 on extreme inputs: at least as close to the float64 truth as the references.

    With |c_prev| up to 1e3, a forget gate in its tail (f ~ 1e-4, where 0.5*tanh(x/2)+0.5
    cancels) carries an absolute rounding error of ~1 ulp of 1.0 (6e-8), which f*c_prev
    multiplies by 1e3: two correct float32 evaluations (glibc's tanhf here, NumPy's SIMD tanh
    there) then differ by ~1e-5 in h, whose scale is 1. Such outputs are held to the float64
    truth instead: the kernel's error may not exceed twice the worst float32 reference's
    error (or 1e-6). Outputs that are not ill-conditioned still pass the plain 1e-6 check.
    """
    e_ref = max(err(r, truth) for r in refs)
    e = err(got, truth)
    tol = max(TOL[np.float32], 2.0 * e_ref)
    assert e <= tol, f"{what} (float32, extreme): error vs float64 truth {e:.3g} > {tol:.3g}"


def compare(what, dt, got, numpy_be, cell_ref, truth, extreme):
    """got against the NumPy backend and the cell reference (see check_ill_conditioned)."""
    if dt is np.float32 and extreme and max(err(got, numpy_be), err(got, cell_ref)) > TOL[dt]:
        check_ill_conditioned(what, got, (numpy_be, cell_ref), truth)
        return
    check(what + " vs NumpyBackend", dt, got, numpy_be)
    check(what + " vs cell", dt, got, cell_ref)


def f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


# -- inputs ------------------------------------------------------------------------------------
SIZES = [(1, 1), (3, 5), (7, 33)]
MODS = ["plain", "mask", "zoneout_train", "zoneout_eval", "dropout", "all"]


def make_mods(rng, kind, B, H, dt):
    """(mask, zc, zh, gmask) for a modifier configuration; None where unused."""
    mask = zc = zh = gm = None
    if kind in ("mask", "all"):
        mask = (rng.random(B) < 0.6).astype(dt)
        mask[0] = 0.0                                # a finished row (zero-length rest)
        if B > 1:
            mask[-1] = 1.0
    if kind in ("zoneout_train", "all"):
        zc = (rng.random((B, H)) < 0.3).astype(dt)
        zh = (rng.random((B, H)) < 0.3).astype(dt)
    if kind == "zoneout_eval":
        zc = np.full((B, H), 0.3, dt)
        zh = np.full((B, H), 0.15, dt)
    if kind in ("dropout", "all"):
        keep = 0.75
        gm = (rng.random((B, H)) < keep).astype(dt) / dt(keep)
    return mask, zc, zh, gm


def make_inputs(rng, B, H, dt, extreme):
    if extreme:
        z = rng.uniform(-1e4, 1e4, (B, 4 * H))
        z[:, ::3] = rng.standard_normal(z[:, ::3].shape) * 5     # keep some gates unsaturated
        z.flat[0] = 1e4
        z.flat[-1] = -1e4
        c_prev = rng.uniform(-1e3, 1e3, (B, H))
        h_prev = rng.uniform(-1, 1, (B, H))
    else:
        z = rng.standard_normal((B, 4 * H)) * 2
        c_prev = rng.standard_normal((B, H)) * 2
        h_prev = rng.uniform(-1, 1, (B, H))
    return z.astype(dt), c_prev.astype(dt), h_prev.astype(dt)


def make_grads(rng, B, H, dt, extreme):
    s = 1e3 if extreme else 1.0
    return tuple((rng.standard_normal((B, H)) * s).astype(dt) for _ in range(3))


CASES = [(dt, B, H, kind, extreme) for dt in (np.float64, np.float32) for (B, H) in SIZES
         for kind in MODS for extreme in (False, True)]


def _id(case):
    dt, B, H, kind, extreme = case
    return f"{np.dtype(dt).name}-B{B}H{H}-{kind}-{'extreme' if extreme else 'random'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_forward_matches_numpy(lib, case):
    dt, B, H, kind, extreme = case
    rng = np.random.default_rng([B, H, MODS.index(kind), int(extreme), np.dtype(dt).itemsize])
    z, c_prev, h_prev = make_inputs(rng, B, H, dt, extreme)
    mods = make_mods(rng, kind, B, H, dt)
    fb = 1.0
    gates, c, h = host_forward(lib, z, c_prev, h_prev, fb, *mods)

    # the in-place NumPy backend (what the CPU path runs) and the readable reference
    zn = z.copy()
    cn, hn = np.empty_like(c_prev), np.empty_like(h_prev)
    NumpyBackend().lstm_forward_step(zn, c_prev, h_prev, cn, hn, fb, *mods)
    gr, cr, hr = cell.pointwise_forward(z, c_prev, h_prev, fb, *mods)
    gt, ct, ht = cell.pointwise_forward(*f64(z, c_prev, h_prev), fb, *f64(*mods))
    compare("forward gates", dt, gates, zn, gr, gt, extreme)
    compare("forward c", dt, c, cn, cr, ct, extreme)
    compare("forward h", dt, h, hn, hr, ht, extreme)

    mask = mods[0]
    if mask is not None and mods[1] is None and mods[2] is None:
        # rows past their end carry the state bit for bit
        done = mask == 0
        assert np.array_equal(c[done], c_prev[done]) and np.array_equal(h[done], h_prev[done])


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_backward_matches_numpy(lib, case):
    dt, B, H, kind, extreme = case
    rng = np.random.default_rng([7, B, H, MODS.index(kind), int(extreme), np.dtype(dt).itemsize])
    z, c_prev, h_prev = make_inputs(rng, B, H, dt, extreme)
    mods = make_mods(rng, kind, B, H, dt)
    gates, _, _ = cell.pointwise_forward(z, c_prev, h_prev, 1.0, *mods)
    gates = gates.astype(dt)
    dy, dh_next, dc_next = make_grads(rng, B, H, dt, extreme)

    dz, dc_prev, dh_skip = host_backward(lib, gates, c_prev, dy, dh_next, dc_next, *mods)

    dzn = np.empty_like(gates)
    dcn, dhn = np.empty_like(c_prev), np.empty_like(c_prev)
    NumpyBackend().lstm_backward_step(gates, c_prev, dy, dh_next, dc_next, dzn, dcn, dhn, *mods)
    dzr, dcr, dhr = cell.pointwise_backward(gates, c_prev, dy, dh_next, dc_next, *mods)
    dzt, dct, dht = cell.pointwise_backward(*f64(gates, c_prev, dy, dh_next, dc_next), *f64(*mods))
    compare("backward dz", dt, dz, dzn, dzr, dzt, extreme)
    compare("backward dc_prev", dt, dc_prev, dcn, dcr, dct, extreme)
    compare("backward dh_skip", dt, dh_skip, dhn, dhr, dht, extreme)

    # the layer's call: dc_prev aliases dc_next and dh_skip aliases dh_next; same results
    dza, dca, dha = host_backward(lib, gates, c_prev, dy, dh_next, dc_next, *mods, alias=True)
    assert np.array_equal(dza, dz) and np.array_equal(dca, dc_prev) and np.array_equal(dha, dh_skip)


@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("fb", [0.0, 1.0, -2.5])
def test_forget_bias_reaches_forget_gate(lib, dt, fb):
    rng = np.random.default_rng(3)
    z, c_prev, h_prev = make_inputs(rng, 2, 4, dt, False)
    gates, c, h = host_forward(lib, z, c_prev, h_prev, fb)
    gr, cr, hr = cell.pointwise_forward(z, c_prev, h_prev, fb)
    check("forward gates vs cell (forget_bias)", dt, gates, gr)
    check("forward c vs cell (forget_bias)", dt, c, cr)
    check("forward h vs cell (forget_bias)", dt, h, hr)


def test_sigmoid_saturates_without_overflow(lib):
    """|z| = 1e4 (and float32's largest values) give exact 0/1 gates and finite states."""
    for dt in (np.float32, np.float64):
        big = np.finfo(dt).max
        #             i: +max  -max     f: +max  -max      g: -1e4  1e4      o: -1e4  1e4
        z = np.array([[big, -big, big, -big, -1e4, 1e4, -1e4, 1e4]], dt)
        c_prev = np.array([[1e3, -1e3]], dt)
        h_prev = np.zeros((1, 2), dt)
        gates, c, h = host_forward(lib, z, c_prev, h_prev, 0.0)
        assert np.all(np.isfinite(gates)) and np.all(np.isfinite(c)) and np.all(np.isfinite(h))
        np.testing.assert_array_equal(gates, [[1, 0, 1, 0, -1, 1, 0, 1]])


# -- LayerNorm LSTM step ------------------------------------------------------------------------
LN_SIZES = [(1, 1), (3, 5), (4, 33), (2, 64)]
LN_CASES = [(dt, B, H, kind, eps) for dt in (np.float64, np.float32) for (B, H) in LN_SIZES
            for kind in MODS for eps in (1e-12, 1e-5)]


def _ln_id(case):
    dt, B, H, kind, eps = case
    return f"{np.dtype(dt).name}-B{B}H{H}-{kind}-eps{eps:g}"


def make_ln_params(rng, H, dt):
    gain = (1.0 + 0.3 * rng.standard_normal(4 * H)).astype(dt)
    shift = (0.2 * rng.standard_normal(4 * H)).astype(dt)
    c_gain = (1.0 + 0.3 * rng.standard_normal(H)).astype(dt)
    c_shift = (0.2 * rng.standard_normal(H)).astype(dt)
    return gain, shift, c_gain, c_shift


def host_ln_forward(lib, z, c_prev, h_prev, gain, shift, c_gain, c_shift, fb, eps,
                    mask=None, zc=None, zh=None, gmask=None):
    """The kernel's LN forward over a copy of z. Returns (gates, zhat, rstd, chat, rstd_c, c, h)."""
    dt = z.dtype.type
    B, H = c_prev.shape
    gates = z.copy()
    zhat = np.full_like(z, np.nan)
    rstd, rstd_c = np.full((B, 4), np.nan, dt), np.full(B, np.nan, dt)
    chat, c, h = (np.full_like(c_prev, np.nan) for _ in range(3))
    getattr(lib, f"host_ln_lstm_forward_step_{SUFFIX[dt]}")(
        *map(_ptr, (gates, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain, shift, c_gain,
                    c_shift)), dt(fb), dt(eps), *map(_ptr, (mask, zc, zh, gmask)), B, H)
    return gates, zhat, rstd, chat, rstd_c, c, h


def host_ln_backward(lib, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift, dy,
                     dh_next, dc_next, dz, dc_prev, dh_skip, part, acc, mods):
    """The two launches of the LN backward: rows (writes dz, dc_prev, dh_skip, part), columns."""
    B, H = c_prev.shape
    sfx = SUFFIX[gates.dtype.type]
    getattr(lib, f"host_ln_lstm_backward_step_{sfx}")(
        *map(_ptr, (gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift, dy, dh_next,
                    dc_next, dz, dc_prev, dh_skip, part, *mods)), B, H)
    getattr(lib, f"host_ln_accumulate_{sfx}")(*map(_ptr, (part, *acc)), B, H)


@pytest.mark.parametrize("case", LN_CASES, ids=[_ln_id(c) for c in LN_CASES])
def test_ln_step_matches_numpy(lib, case):
    from xlstm.layernorm import ln_cell_backward, ln_cell_forward

    dt, B, H, kind, eps = case
    be = NumpyBackend()
    rng = np.random.default_rng([11, B, H, MODS.index(kind), int(eps < 1e-6), np.dtype(dt).itemsize])
    z, c_prev, h_prev = make_inputs(rng, B, H, dt, False)
    params = make_ln_params(rng, H, dt)
    gain, shift, c_gain, c_shift = params
    mods = make_mods(rng, kind, B, H, dt)
    fb = 1.0

    # forward: kernel vs the NumPy backend vs the readable reference
    got = host_ln_forward(lib, z, c_prev, h_prev, *params, fb, eps, *mods)
    zn = z.copy()
    want = [zn, np.empty_like(z), np.empty((B, 4), dt), np.empty_like(c_prev), np.empty(B, dt),
            np.empty_like(c_prev), np.empty_like(h_prev)]
    be.ln_lstm_forward_step(zn, want[1], want[2], want[3], want[4], c_prev, h_prev, want[5], want[6],
                            *params, fb, eps, *mods)
    ref = ln_cell_forward(z, c_prev, h_prev, *params, fb, eps, *mods)
    refs = [ref["gates"], ref["zhat"], ref["rstd"].reshape(B, 4), ref["chat"], ref["rstd_c"].reshape(B),
            ref["c"], ref["h"]]
    names = ["gates", "zhat", "rstd", "chat", "rstd_c", "c", "h"]
    for name, g_, w_, r_ in zip(names, got, want, refs):
        if name.startswith("rstd"):     # ~1/sqrt(eps) on constant rows: compare relatively
            g_, w_, r_ = g_ / w_, np.ones_like(w_), r_ / w_
        check(f"LN forward {name} vs NumpyBackend", dt, g_, w_)
        check(f"LN forward {name} vs layernorm", dt, g_, r_)
    gates, zhat, rstd, chat, rstd_c = got[:5]

    # backward: accumulators start non-zero to check that the kernel adds (+=)
    dy, dh_next, dc_next = make_grads(rng, B, H, dt, False)
    acc0 = [rng.standard_normal(n).astype(dt) for n in (4 * H, 4 * H, H, H)]
    dz, dc_prev, dh_skip = (np.full_like(a, np.nan) for a in (z, c_prev, c_prev))
    part = np.full((B, 10 * H), np.nan, dt)
    acc = [a.copy() for a in acc0]
    host_ln_backward(lib, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift, dy,
                     dh_next, dc_next, dz, dc_prev, dh_skip, part, acc, mods)

    dzn, dcn, dhn = np.empty_like(z), np.empty_like(c_prev), np.empty_like(c_prev)
    accn = [a.copy() for a in acc0]
    be.ln_lstm_backward_step(gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift,
                             dy, dh_next, dc_next, dzn, dcn, dhn, *accn, *mods)
    rb = ln_cell_backward(ref, c_prev, gain, c_gain, dy, dh_next, dc_next, *mods)
    accr = [a0 + rb[k] for a0, k in zip(acc0, ("dgain", "dshift", "dc_gain", "dc_shift"))]
    for name, g_, w_, r_ in zip(["dz", "dc_prev", "dh_skip", "dgain", "dshift", "dc_gain", "dc_shift"],
                                [dz, dc_prev, dh_skip, *acc], [dzn, dcn, dhn, *accn],
                                [rb["dz"], rb["dc_prev"], rb["dh_skip"], *accr]):
        check(f"LN backward {name} vs NumpyBackend", dt, g_, w_)
        check(f"LN backward {name} vs layernorm", dt, g_, r_)

    # aliasing as the layer calls it: dc_prev is dc_next, dh_skip is dh_next
    dca, dha = dc_next.copy(), dh_next.copy()
    dza = np.full_like(z, np.nan)
    acca = [a.copy() for a in acc0]
    host_ln_backward(lib, gates, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift, dy,
                     dha, dca, dza, dca, dha, part, acca, mods)
    assert np.array_equal(dza, dz) and np.array_equal(dca, dc_prev) and np.array_equal(dha, dh_skip)
    assert all(np.array_equal(a, b) for a, b in zip(acca, acc))
