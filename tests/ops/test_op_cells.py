"""The plain and LayerNorm cell steps (``xlstm.ops.lstm_cell``, ``xlstm.ops.ln_lstm_cell``):
the NumPy implementation against the readable reference (``cell.py``, ``layernorm.py``), the
reference's backward against float64 finite differences of its forward, and the CUDA kernels
built for the host (through the CuPy backend on the stand-in) against NumPy."""
from __future__ import annotations

import numpy as np
import pytest

from support.compare import MODS, compare_steps, step_inputs
from xlstm import cell, layernorm
from xlstm.backends import resolve

TOL = {np.float64: 1e-12, np.float32: 2e-6}
B, H = 3, 5


def _scaled(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", MODS)
def test_numpy_plain_step_equals_the_reference(dtype, kind):
    be = resolve("numpy")
    z, c_prev, h_prev, mods, (dy, dh_next, dc_next) = step_inputs(np.random.default_rng(1), B, H, dtype, kind)
    gates_ref, c_ref, h_ref = cell.pointwise_forward(z, c_prev, h_prev, 1.0, *mods)
    g, c, h = z.copy(), np.empty_like(c_prev), np.empty_like(h_prev)
    be.lstm_forward_step(g, c_prev, h_prev, c, h, 1.0, *mods)
    for got, want in ((g, gates_ref), (c, c_ref), (h, h_ref)):
        assert got.dtype == dtype and _scaled(got, want) <= TOL[dtype]
    dz_ref, dc_ref, dh_ref = cell.pointwise_backward(g, c_prev, dy, dh_next, dc_next, *mods)
    dz, dc, dh = np.empty_like(z), dc_next.copy(), dh_next.copy()
    be.lstm_backward_step(g, c_prev, dy, dh, dc, dz, dc, dh, *mods)      # the layer's aliasing
    for got, want in ((dz, dz_ref), (dc, dc_ref), (dh, dh_ref)):
        assert _scaled(got, want) <= TOL[dtype]


@pytest.mark.parametrize("kind", MODS)
def test_plain_reference_backward_is_the_gradient_of_its_forward(kind):
    """Loss L = sum(wc * c) + sum(wh * h) of one step: dz, dc_prev and dh_prev (the part that
    skips the gates) against central differences in float64."""
    rng = np.random.default_rng(2)
    z, c_prev, h_prev, mods, _ = step_inputs(rng, B, H, np.float64, kind)
    wc, wh = rng.standard_normal((2, B, H))

    def loss(z_, c_, h_):
        _, c, h = cell.pointwise_forward(z_, c_, h_, 1.0, *mods)
        return float(np.sum(wc * c) + np.sum(wh * h))

    gates, _, _ = cell.pointwise_forward(z, c_prev, h_prev, 1.0, *mods)
    # dL/dh_t = wh (the step's output gradient dy with dh_next = 0), dL/dc_t = wc
    dz, dc_prev, dh_skip = cell.pointwise_backward(gates, c_prev, np.zeros_like(wh), wh, wc, *mods)
    for arr, grad in ((z, dz), (c_prev, dc_prev), (h_prev, dh_skip)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            keep = arr[idx]
            arr[idx] = keep + 1e-6
            up = loss(z, c_prev, h_prev)
            arr[idx] = keep - 1e-6
            down = loss(z, c_prev, h_prev)
            arr[idx] = keep
            num[idx] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)


def _ln_params(rng, dt):
    return ((1 + 0.3 * rng.standard_normal(4 * H)).astype(dt), (0.2 * rng.standard_normal(4 * H)).astype(dt),
            (1 + 0.3 * rng.standard_normal(H)).astype(dt), (0.2 * rng.standard_normal(H)).astype(dt))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", MODS)
def test_numpy_layer_norm_step_equals_the_reference(dtype, kind):
    be = resolve("numpy")
    rng = np.random.default_rng(3)
    z, c_prev, h_prev, mods, (dy, dh_next, dc_next) = step_inputs(rng, B, H, dtype, kind)
    gain, shift, c_gain, c_shift = _ln_params(rng, dtype)
    eps = 1e-5
    ref = layernorm.ln_cell_forward(z, c_prev, h_prev, gain, shift, c_gain, c_shift, 1.0, eps, *mods)
    g, zhat, rstd = z.copy(), np.empty_like(z), np.empty((B, 4), dtype)
    chat, rstd_c, c, h = np.empty_like(c_prev), np.empty(B, dtype), np.empty_like(c_prev), np.empty_like(h_prev)
    be.ln_lstm_forward_step(g, zhat, rstd, chat, rstd_c, c_prev, h_prev, c, h, gain, shift, c_gain, c_shift,
                            1.0, eps, *mods)
    for got, want in ((g, ref["gates"]), (zhat, ref["zhat"]), (chat, ref["chat"]), (c, ref["c"]), (h, ref["h"])):
        assert _scaled(got, want) <= 10 * TOL[dtype]
    r = layernorm.ln_cell_backward(ref, c_prev, gain, c_gain, dy, dh_next, dc_next, *mods)
    acc = [np.zeros(4 * H, dtype), np.zeros(4 * H, dtype), np.zeros(H, dtype), np.zeros(H, dtype)]
    dz, dc, dh = np.empty_like(z), dc_next.copy(), dh_next.copy()
    be.ln_lstm_backward_step(g, zhat, rstd, chat, rstd_c, c_prev, gain, c_gain, c_shift, dy, dh, dc, dz, dc, dh,
                             *acc, *mods)
    for got, name in ((dz, "dz"), (dc, "dc_prev"), (dh, "dh_skip"), (acc[0], "dgain"), (acc[1], "dshift"),
                      (acc[2], "dc_gain"), (acc[3], "dc_shift")):
        assert _scaled(got, r[name]) <= 10 * TOL[dtype], name


@pytest.mark.parametrize("kind", ["plain", "all"])
def test_layer_norm_reference_backward_is_the_gradient_of_its_forward(kind):
    rng = np.random.default_rng(4)
    z, c_prev, h_prev, mods, _ = step_inputs(rng, B, H, np.float64, kind)
    params = list(_ln_params(rng, np.float64))
    wc, wh = rng.standard_normal((2, B, H))

    def loss():
        f = layernorm.ln_cell_forward(z, c_prev, h_prev, *params, 1.0, 1e-5, *mods)
        return float(np.sum(wc * f["c"]) + np.sum(wh * f["h"]))

    fwd = layernorm.ln_cell_forward(z, c_prev, h_prev, *params, 1.0, 1e-5, *mods)
    r = layernorm.ln_cell_backward(fwd, c_prev, params[0], params[2], np.zeros_like(wh), wh, wc, *mods)
    for arr, grad in ((z, r["dz"]), (c_prev, r["dc_prev"]), (h_prev, r["dh_skip"]), (params[0], r["dgain"]),
                      (params[1], r["dshift"]), (params[2], r["dc_gain"]), (params[3], r["dc_shift"])):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            keep = arr[idx]
            arr[idx] = keep + 1e-6
            up = loss()
            arr[idx] = keep - 1e-6
            down = loss()
            arr[idx] = keep
            num[idx] = (up - down) / 2e-6
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
def test_host_built_kernels_equal_numpy(emulated, dtype, kind):
    """The CuPy launches of both cells (arguments checked against the specs) run the kernels'
    host build; every output against the NumPy implementation."""
    be, _ = emulated
    compare_steps(be, np.dtype(dtype).type, 4, 33, kind)
