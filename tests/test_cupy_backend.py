"""The CuPy backend: what it says where it cannot run, its launches, and CuPy-vs-NumPy equality.

Three groups:

* CPU, always: ``set_backend("cupy")`` on a machine without a usable GPU raises
  BackendUnavailableError with the reason; ``auto`` falls back to NumPy; ``xlstm info`` says why.
* CPU, always (where g++ exists): ``CupyBackend`` itself, unchanged, runs against a stand-in
  ``cupy`` module whose RawModule launches the host twins of the kernels
  (``tests/support/kernels_host_shim.cpp``) and whose arrays are NumPy's. This checks every launch of
  the backend (argument count, order and C types read from the .cu source, NULL for absent
  masks, dtype-typed scalars, contiguity, block sizes) and runs whole LSTMs through it against
  the NumPy backend. Only the device itself (NVRTC's binary, cuBLAS) is not exercised.
  The stand-in also has streams whose capture records launches and GEMMs (with the addresses
  they were given) for ``Graph.launch`` to replay, and a stand-in of nvmath's cuBLAS binding:
  tests/test_cuda_graphs.py uses them for the CUDA-graph path.
* ``@pytest.mark.gpu``: the same comparisons on a real GPU (skipped with the reason elsewhere,
  by tests/conftest.py): pointwise steps and full LSTMs (layers {1,2}, bidirectional, lengths,
  zoneout + recurrent dropout with shared masks, layer norm), every output, state, dx and
  gradient, float64 to 1e-10 and float32 to 1e-5, normwise max|a-b| / max|b|.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest

import xlstm
from support.compare import CONFIG_IDS, CONFIGS, MODS, assert_close, compare_models, compare_steps, step_inputs
from xlstm.backends import NumpyBackend, cupy_unavailable_reason, resolve
from xlstm.errors import BackendUnavailableError, InputError

# =============================================================================================
# 1. Where cupy cannot run
# =============================================================================================
no_gpu = pytest.mark.skipif(cupy_unavailable_reason() is None, reason="a usable GPU is present here")


@no_gpu
def test_explicit_cupy_raises_with_the_reason():
    reason = cupy_unavailable_reason()
    with pytest.raises(BackendUnavailableError) as e:
        xlstm.set_backend("cupy")
    msg = str(e.value)
    assert reason in msg and "numpy" in msg
    assert xlstm.get_backend().name == "numpy"


@no_gpu
def test_auto_falls_back_to_numpy():
    assert resolve("auto").name == "numpy"
    assert xlstm.available_backends() == ["numpy"]
    out = subprocess.run([sys.executable, "-c", "import xlstm; print(xlstm.set_backend('auto').name)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"
    if importlib.util.find_spec("cupy") is not None:     # an installed GPU package that cannot run: said once
        assert out.stderr.count("cupy is installed but cannot run") == 1, out.stderr
    else:                                                 # a CPU-only installation: nothing to explain
        assert "backend 'auto'" not in out.stderr


@no_gpu
def test_info_reports_why_cupy_is_unavailable():
    out = subprocess.run([sys.executable, "-m", "xlstm", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("cupy")]
    assert line and "unavailable" in line[0] and cupy_unavailable_reason() in line[0]


# =============================================================================================
# 2. CupyBackend's launches on the host (a stand-in cupy module)
# =============================================================================================
# -- the emulated tests -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (4, 33)])
def test_emulated_steps_match_numpy(emulated, dtype, kind, B, H):
    be, fake = emulated
    compare_steps(be, np.dtype(dtype).type, B, H, kind)
    assert fake.launches, "no kernel was launched"


@pytest.mark.parametrize("persistent", ["off", "on"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", CONFIGS, ids=CONFIG_IDS)
def test_emulated_models_match_numpy(emulated, dtype, name, kwargs, use_lengths, persistent):
    be, fake = emulated
    be.persistent = persistent
    compare_models(be, dtype, kwargs, use_lengths)
    assert fake.gemms, "matmul_add did not reach cuBLAS's gemm"
    if not kwargs.get("layer_norm"):
        ran = {n for n in fake.launches if n.startswith("lstm_persistent")}
        assert bool(ran) == (persistent == "on"), f"persistent={persistent}, launched {sorted(set(fake.launches))}"


def test_emulated_module_is_the_kernel_source(emulated):
    from xlstm.kernels import kernel_source

    be, fake = emulated
    rng = np.random.default_rng(0)
    z, c_prev, h_prev, _, _ = step_inputs(rng, 2, 3, np.float32, "plain")
    c, h = np.empty_like(c_prev), np.empty_like(h_prev)
    be.lstm_forward_step(z, c_prev, h_prev, c, h, 1.0)
    be.lstm_forward_step(z, c_prev, h_prev, c, h, 1.0)
    assert len(fake.modules) == 1, "the module must be compiled once, not per step"
    code, options = fake.modules[0]
    assert code == kernel_source() and "-std=c++17" in options
    assert fake.launches == ["lstm_forward_step_f32"] * 2


def test_emulated_launches_per_step(emulated):
    """Per time step: one recurrent GEMM and one fused kernel, forward and backward."""
    be, fake = emulated
    be.persistent = "off"
    T = 4
    m = xlstm.LSTM(3, 4, backend=be, seed=0)
    x = np.random.default_rng(0).standard_normal((T, 2, 3)).astype(np.float32)
    fake.launches.clear()
    fake.gemms.clear()
    y, _ = m.forward(x)
    assert fake.launches == ["lstm_forward_step_f32"] * T and len(fake.gemms) == T
    fake.launches.clear()
    fake.gemms.clear()
    m.backward(np.ones_like(y))
    assert fake.launches == ["lstm_backward_step_f32"] * T
    assert len(fake.gemms) == T + 2                     # + dW and dU after the loop


def test_emulated_bad_arguments_are_named(emulated):
    be, _ = emulated
    z = np.zeros((2, 8), np.float32)
    c_prev = np.zeros((2, 2), np.float32)
    c, h = np.zeros_like(c_prev), np.zeros_like(c_prev)
    with pytest.raises(InputError, match="h_prev.*dtype"):
        be.lstm_forward_step(z, c_prev, c_prev.astype(np.float64), c, h, 1.0)
    with pytest.raises(InputError, match="c_prev.*C-contiguous"):
        be.lstm_forward_step(z, np.zeros((2, 4), np.float32)[:, ::2], c_prev, c, h, 1.0)
    with pytest.raises(InputError, match=r"mask has shape \(3,\)"):
        be.lstm_forward_step(z, c_prev, c_prev, c, h, 1.0, mask=np.ones(3, np.float32))
    with pytest.raises(InputError, match="float32 or float64"):
        be.lstm_forward_step(z.astype(np.float16), c_prev.astype(np.float16), c_prev.astype(np.float16),
                             c.astype(np.float16), h.astype(np.float16), 1.0)


def test_to_numpy_copy_of_a_host_array_owns_its_memory():
    """copy=True is a snapshot also when a host array reaches the CuPy backend: the real
    ``cupy.asnumpy`` (no device needed for this) returns a NumPy array itself."""
    pytest.importorskip("cupy")
    from xlstm.backends.cupy_backend import CupyBackend

    be = CupyBackend()
    a = np.arange(4.0)
    assert be.to_numpy(a) is a
    kept = be.to_numpy(a, copy=True)
    a += 1
    np.testing.assert_array_equal(kept, np.arange(4.0))


def language_model_step(backend, dtype, grad_method, layer_norm, seed=3, V=13, E=6, H=10, T=7, B=4):
    """One training step's gradients of Embedding -> LSTM -> Dense -> cross-entropy, with
    ids that repeat (a third of them one id), on ``backend``; host copies by name."""
    from xlstm.layers import Dense, Embedding, Sequential
    from xlstm.losses import cross_entropy

    rng = np.random.default_rng(seed)
    model = Sequential(Embedding(V, E, dtype=dtype, seed=seed, backend=backend, grad_method=grad_method),
                       xlstm.LSTM(E, H, layer_norm=layer_norm, dtype=dtype, seed=seed, backend=backend),
                       Dense(H, V, dtype=dtype, seed=seed, backend=backend))
    ids = rng.integers(0, V, (T, B))
    ids.flat[rng.permutation(T * B)[: T * B // 3]] = 2
    targets = rng.integers(0, V, (T, B))
    be = model.backend
    logits = model.forward(be.asarray(ids))
    loss, dlogits = cross_entropy(logits, be.asarray(targets))
    model.backward(dlogits)
    be.synchronize()
    return loss, {k: be.to_numpy(g, copy=True) for k, g in model.grads.items()}


class _NoAddAt:
    """np.add, except that ``add.at`` (atomicAdd in CuPy: run-to-run different sums) fails."""

    def __call__(self, *a, **kw):
        return np.add(*a, **kw)

    def at(self, *a, **kw):
        raise AssertionError("xp.add.at on the training path: CuPy runs it with atomics")


@pytest.mark.parametrize("grad_method", ["auto", "sort", "onehot"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_emulated_training_gradients_match_numpy_without_atomics(emulated, monkeypatch, grad_method, layer_norm):
    """The language model's gradients through the CuPy backend equal the NumPy backend's, and
    the embedding's scatter-add takes no ``add.at``; "auto" is the one-hot GEMM for a small
    vocabulary (no argsort)."""
    be, fake = emulated
    monkeypatch.setattr(fake.module, "add", _NoAddAt(), raising=False)
    if grad_method == "auto":
        monkeypatch.setattr(fake.module, "argsort", lambda *a, **k: pytest.fail("auto sorted a small vocabulary"),
                            raising=False)
    loss, grads = language_model_step(be, "float64", grad_method, layer_norm)
    ref_loss, ref = language_model_step("numpy", "float64", grad_method, layer_norm)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    assert grads.keys() == ref.keys()
    for k in ref:
        assert_close(f"grad {k}", grads[k], ref[k], "float64")


# =============================================================================================
# 3. On a GPU
# =============================================================================================
@pytest.fixture
def cupy_be():
    return resolve("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (4, 33), (16, 256), (5, 1000)])
def test_gpu_steps_match_numpy(cupy_be, dtype, kind, B, H):
    compare_steps(cupy_be, np.dtype(dtype).type, B, H, kind)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", CONFIGS, ids=CONFIG_IDS)
def test_gpu_models_match_numpy(cupy_be, dtype, name, kwargs, use_lengths):
    compare_models(cupy_be, dtype, kwargs, use_lengths)


@pytest.mark.gpu
def test_gpu_module_to_cupy_and_back():
    m = xlstm.LSTM(4, 8, num_layers=2, bidirectional=True, dtype="float64", seed=1, backend="numpy")
    x = np.random.default_rng(1).standard_normal((5, 2, 4))
    y, _ = m.forward(x)
    m.to("cupy")
    assert m.backend.name == "cupy" and type(m.params["l0.W"]).__module__.startswith("cupy")
    y2, _ = m.forward(x)                                 # NumPy input moved to the device
    assert_close("y after to('cupy')", m.backend.to_numpy(y2), y, "float64")
    m.to("numpy")
    y3, _ = m.forward(x)
    assert_close("y after to('numpy')", y3, y, "float64")


@pytest.mark.gpu
def test_gpu_bad_layout_raises():
    be = resolve("cupy")
    cp = be.xp
    z = cp.zeros((2, 8), cp.float32)
    c_prev = cp.zeros((2, 2), cp.float32)
    with pytest.raises(InputError, match="C-contiguous"):
        be.lstm_forward_step(z, cp.zeros((2, 4), cp.float32)[:, ::2], c_prev, c_prev.copy(),
                             c_prev.copy(), 1.0)


# -- the persistent kernels' launches (the stand-in runs their host schedule) -------------------
def sequence_inputs(rng, T, B, H, dt, kind):
    """Inputs of the sequence ops: gates (x@W+b), U, h0, c0, dy, dh_n, dc_n and the masks."""
    gates = (rng.standard_normal((T, B, 4 * H)) * 1.5).astype(dt)
    U = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(dt)
    h0, c0 = rng.uniform(-1, 1, (B, H)).astype(dt), rng.standard_normal((B, H)).astype(dt)
    dy = rng.standard_normal((T, B, H)).astype(dt)
    dh_n, dc_n = rng.standard_normal((B, H)).astype(dt), rng.standard_normal((B, H)).astype(dt)
    mask = zc = zh = gm = None
    if kind in ("mask", "all"):
        mask = (np.arange(T)[:, None] < rng.integers(0, T + 1, B)[None, :]).astype(dt)
    if kind in ("zoneout", "all"):
        zc = (rng.random((T, B, H)) < 0.3).astype(dt)
        zh = (rng.random((T, B, H)) < 0.3).astype(dt)
    if kind in ("dropout", "all"):
        gm = ((rng.random((T, B, H)) < 0.75) / 0.75).astype(dt)
    return gates, U, h0, c0, dy, dh_n, dc_n, (mask, zc, zh, gm)


def compare_sequences(be, dt, T, B, H, kind, seed=0, tol=None):
    """be.persistent_lstm_*_sequence against NumpyBackend's sequence ops, every output.

    Returns the device's (hs, dz, dh0) on the host, for the repeatability check."""
    rng = np.random.default_rng([seed, T, B, H, MODS.index(kind)])
    gates, U, h0, c0, dy, dh_n, dc_n, mods = sequence_inputs(rng, T, B, H, dt, kind)
    nb = NumpyBackend()
    on = lambda *arrays: [None if a is None else be.asarray(a) for a in arrays]  # noqa: E731
    dmods = on(*mods)

    gn, hn, cn = gates.copy(), np.empty((T + 1, B, H), dt), np.empty((T + 1, B, H), dt)
    hn[0], cn[0] = h0, c0
    nb.lstm_forward_sequence(gn, hn, cn, U, 1.0, *mods)
    gd, hd, cd, Ud = on(gates, hn * 0, cn * 0, U)
    hd[0], cd[0] = be.asarray(h0), be.asarray(c0)
    be.persistent_lstm_forward_sequence(gd, hd, cd, Ud, 1.0, *dmods)
    for what, g, w in (("gates", gd, gn), ("hs", hd, hn), ("cs", cd, cn)):
        assert_close(f"persistent forward {what} [{kind}]", be.to_numpy(g), w, dt, tol)

    UT = np.ascontiguousarray(U.T)
    dzn, dhr, dcr = np.empty_like(gates), dh_n.copy(), dc_n.copy()
    nb.lstm_backward_sequence(gn, cn, dy, dhr, dcr, dzn, UT, *mods)
    gd, cd, dyd, dhd, dcd, UTd = on(gn, cn, dy, dh_n, dc_n, UT)
    dzd = be.xp.empty((T, B, 4 * H), dt)
    be.persistent_lstm_backward_sequence(gd, cd, dyd, dhd, dcd, dzd, UTd, *dmods)
    for what, g, w in (("dz", dzd, dzn), ("dh0", dhd, dhr), ("dc0", dcd, dcr)):
        assert_close(f"persistent backward {what} [{kind}]", be.to_numpy(g), w, dt, tol)
    return be.to_numpy(hd), be.to_numpy(dzd), be.to_numpy(dhd)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("sms,T,B,H", [(1, 3, 2, 5), (3, 4, 3, 7), (64, 3, 5, 33), (2, 2, 2, 64)])
def test_emulated_persistent_sequences_match_numpy(emulated, dtype, kind, sms, T, B, H):
    be, fake = emulated
    fake.sms = sms                         # the grid: at most one block per SM
    compare_sequences(be, np.dtype(dtype).type, T, B, H, kind)
    sfx = "f64" if dtype == "float64" else "f32"
    assert fake.launches == [f"lstm_persistent_forward_{sfx}", f"lstm_persistent_backward_{sfx}"]
    code, _ = fake.modules[-1]
    from xlstm.kernels import PERSISTENT_SOURCE, kernel_source
    assert code == kernel_source(PERSISTENT_SOURCE)


def test_emulated_persistent_large_smem_sets_the_attribute(emulated):
    """Above 48 KB of shared memory the launch raises the kernel's opt-in attribute first."""
    be, fake = emulated
    fake.sms = 2                           # H=64 over 2 blocks: 32 units, ~75 KB in float64
    plan = be.persistent_plan(2, 64, np.float64)
    assert plan.smem_forward > 48 * 1024
    compare_sequences(be, np.float64, 2, 2, 64, "plain")


def test_emulated_persistent_refuses_what_does_not_fit(emulated):
    from xlstm.backends.persistent import PersistentUnfit

    be, fake = emulated
    rng = np.random.default_rng(0)
    T, B, H = 2, 2, 8
    gates, U, h0, c0, *_ = sequence_inputs(rng, T, B, H, np.float32, "plain")
    hs, cs = np.zeros((T + 1, B, H), np.float32), np.zeros((T + 1, B, H), np.float32)
    fake.occupancy = 0                     # the driver says: not one block fits an SM
    with pytest.raises(PersistentUnfit, match="not co-resident"):
        be.persistent_lstm_forward_sequence(gates.copy(), hs, cs, U, 1.0)
    be.persistent = "on"                   # forced: the refusal reaches the caller
    with pytest.raises(PersistentUnfit):
        be.lstm_forward_sequence(gates.copy(), hs, cs, U, 1.0)
    be.persistent = "auto"                 # auto: falls back to the per-step loop
    fake.launches.clear()
    g = gates.copy()
    be.lstm_forward_sequence(g, hs, cs, U, 1.0)
    assert be.last_path == "per-step" and fake.launches == ["lstm_forward_step_f32"] * T
    # U's slice too large for shared memory: float64, H=4096 over 2 blocks
    with pytest.raises(PersistentUnfit, match="shared memory"):
        be.persistent_plan(4, 4096, np.float64)


def test_emulated_persistent_bad_arguments_are_named(emulated):
    be, _ = emulated
    T, B, H = 2, 2, 3
    g = np.zeros((T, B, 4 * H), np.float32)
    hs = np.zeros((T + 1, B, H), np.float32)
    U = np.zeros((H, 4 * H), np.float32)
    with pytest.raises(InputError, match="U has dtype"):
        be.persistent_lstm_forward_sequence(g, hs, hs.copy(), U.astype(np.float64), 1.0)
    with pytest.raises(InputError, match=r"mask has shape \(2,\)"):
        be.persistent_lstm_forward_sequence(g, hs, hs.copy(), U, 1.0, mask=np.ones(B, np.float32))
    with pytest.raises(InputError, match=r"UT has shape"):
        be.persistent_lstm_backward_sequence(g, hs, hs[1:].copy(), hs[0].copy(), hs[0].copy(), g.copy(), U)


def test_persistent_picker(monkeypatch):
    from xlstm.backends import persistent as P

    assert P.crossover("NVIDIA H200") is P.CROSSOVER["H200"]
    assert P.crossover("Tesla T4") is P.CROSSOVER[""]
    assert P.choose("auto", B=64, H=64, device_name="NVIDIA H200")
    assert not P.choose("auto", B=64, H=1024, device_name="NVIDIA H200")
    assert not P.choose("auto", B=512, H=64, device_name="NVIDIA H200")
    assert P.choose("on", B=512, H=4096, device_name="x") and not P.choose("off", B=1, H=1, device_name="x")
    monkeypatch.setenv("XLSTM_PERSISTENT", "off")
    assert P.mode_from_env() == "off"
    monkeypatch.setenv("XLSTM_PERSISTENT", "sometimes")
    with pytest.raises(InputError, match="XLSTM_PERSISTENT"):
        P.mode_from_env()
    with pytest.raises(InputError, match="persistent mode"):
        P.choose("yes", B=1, H=1, device_name="x")


def test_persistent_plan_on_an_h200():
    """What fits an H200 (132 SMs, 227 KB a block): float32 up to H=1024, float64 below it."""
    from xlstm.backends.persistent import PersistentUnfit, plan

    h200 = dict(sm_count=132, smem_per_block=232448, smem_per_sm=233472)
    p = plan(64, 1024, 4, **h200)
    # 8 units a block x 16 row groups of 4 = 128 work items: 256 threads, a K-split of 2
    assert (p.NB, p.nt, p.KS) == (128, 256, 2) and max(p.smem_forward, p.smem_backward) <= 232448
    p = plan(16, 64, 4, **h200)            # 4 work items: the K-split stops at sqrt(H) = 8
    assert (p.NB, p.nt, p.KS) == (64, 256, 8)
    p = plan(64, 1280, 4, **h200)          # 10 units x 16 row groups: 160 items
    assert (p.NB, p.nt, p.KS) == (128, 256, 1)
    plan(64, 768, 8, **h200)
    with pytest.raises(PersistentUnfit, match="shared memory"):
        plan(64, 1024, 8, **h200)


# -- persistent kernels on a GPU ----------------------------------------------------------------
# float64 to 1e-12 against NumPy (float32 as the other device tests, 1e-5)
PERSISTENT_TOL = {"float64": 1e-12, "float32": 1e-5}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("T,B,H", [(3, 2, 5), (8, 3, 33), (16, 16, 64), (8, 64, 256), (4, 16, 1000)])
def test_gpu_persistent_sequences_match_numpy(cupy_be, dtype, kind, T, B, H):
    from xlstm.backends.persistent import PersistentUnfit

    try:
        cupy_be.persistent_plan(B, H, dtype)
    except PersistentUnfit as e:
        if H < 1000:                       # every smaller shape fits any sm_80+ device: a refusal is a bug
            raise
        pytest.skip(f"does not fit this device: {e}")   # float64 at H=1000 on an H200 (see the plan test)
    compare_sequences(cupy_be, np.dtype(dtype).type, T, B, H, kind, tol=PERSISTENT_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_persistent_is_bitwise_repeatable(cupy_be, dtype):
    dt = np.dtype(dtype).type
    first = compare_sequences(cupy_be, dt, 12, 16, 256, "all", seed=3, tol=PERSISTENT_TOL)
    for _ in range(2):
        again = compare_sequences(cupy_be, dt, 12, 16, 256, "all", seed=3, tol=PERSISTENT_TOL)
        assert all(np.array_equal(a, b) for a, b in zip(first, again)), "persistent results differ between runs"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", [c for c in CONFIGS if not c[1].get("layer_norm")],
                         ids=[i for c, i in zip(CONFIGS, CONFIG_IDS) if not c[1].get("layer_norm")])
def test_gpu_persistent_models_match_numpy(dtype, name, kwargs, use_lengths):
    be = resolve("cupy")
    old = be.persistent
    be.persistent = "on"
    try:
        compare_models(be, dtype, kwargs, use_lengths)
        assert be.last_path == "persistent"
    finally:
        be.persistent = old


@pytest.mark.gpu
def test_gpu_persistent_refuses_an_oversized_grid():
    """A plan whose blocks are not co-resident is refused before launch (no hang)."""
    import dataclasses

    from xlstm.backends.persistent import PersistentUnfit

    be = resolve("cupy")
    cp = be.xp
    T, B, H = 2, 2, 64
    name, sms, per_block, per_sm = be.device_info()
    plan = be.persistent_plan(B, H, np.float32)
    big = dataclasses.replace(plan, NB=sms * 64, smem_forward=per_block)   # more than the device holds
    with pytest.raises(PersistentUnfit, match="not co-resident"):
        be.launch_persistent("lstm_persistent_forward", cp.float32, (), T, B, H, plan=big)


def test_emulated_persistent_empty_sequence_launches_nothing(emulated):
    be, fake = emulated
    B, H = 2, 3
    g = np.zeros((0, B, 4 * H), np.float32)
    hs = np.ones((1, B, H), np.float32)
    dh, dc = np.ones((B, H), np.float32), np.ones((B, H), np.float32)
    be.persistent_lstm_forward_sequence(g, hs, hs.copy(), np.zeros((H, 4 * H), np.float32), 1.0)
    be.persistent_lstm_backward_sequence(g, hs, g[..., :H], dh, dc, g.copy(), np.zeros((4 * H, H), np.float32))
    assert fake.launches == [] and (dh == 1).all() and (dc == 1).all()


@pytest.mark.gpu
@pytest.mark.parametrize("grad_method", ["auto", "sort", "onehot"])
@pytest.mark.parametrize("V,N", [(97, 4096), (5000, 4096)])
def test_gpu_embedding_gradient_is_bitwise_repeatable(cupy_be, grad_method, V, N):
    """The embedding gradient on the device: equal to np.add.at (float64 1e-12) and the same
    bits on every repetition (the add.at it replaced is not: atomics)."""
    from xlstm.layers import scatter_add_rows

    cp = cupy_be.xp
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, N)
    ids[: N // 4] = 1                                   # a long segment, as a space in text
    ids = rng.permutation(ids)
    rows = rng.standard_normal((N, 64))
    ref = np.zeros((V, 64))
    np.add.at(ref, ids, rows)
    d_ids, d_rows = cp.asarray(ids), cp.asarray(rows.astype(np.float32))
    first = None
    for _ in range(5):
        out = cp.zeros((V, 64), cp.float32)
        scatter_add_rows(cp, out, d_ids, d_rows, grad_method)
        got = cp.asnumpy(out)
        if first is None:
            first = got
        assert np.array_equal(got, first), "float32 sums differ between identical calls"
    out64 = cp.zeros((V, 64), cp.float64)
    scatter_add_rows(cp, out64, d_ids, cp.asarray(rows), grad_method)
    np.testing.assert_allclose(cp.asnumpy(out64), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("layer_norm", [False, True])
def test_gpu_training_gradients_are_bitwise_repeatable(cupy_be, layer_norm):
    """A whole language-model step on the device, three times: the same loss and gradient bits."""
    runs = [language_model_step(cupy_be, "float32", "auto", layer_norm, V=97, E=32, H=64, T=32, B=16)
            for _ in range(3)]
    for loss, grads in runs[1:]:
        assert loss == runs[0][0]
        assert all(np.array_equal(grads[k], runs[0][1][k]) for k in grads), \
            [k for k in grads if not np.array_equal(grads[k], runs[0][1][k])]


@pytest.mark.parametrize("version,accepted", [("14.1.0", False), ("13.6.0", False), ("14.2.0", True),
                                              ("15.0.0rc1", True)])
def test_the_persistent_path_refuses_a_cupy_before_14_2(emulated, monkeypatch, version, accepted):
    """CuPy < 14.2 links cooperative kernels against a CUDA toolkit that a pip install lacks:
    forced on, the persistent path refuses naming the version; 'auto' takes the per-step loop."""
    from xlstm.backends.persistent import PersistentUnfit

    be, fake = emulated
    monkeypatch.setattr(fake.module, "__version__", version)
    x = np.random.default_rng(0).standard_normal((3, 2, 3)).astype(np.float32)
    be.persistent = "on"
    if accepted:
        xlstm.LSTM(3, 4, backend=be, seed=0).forward(x)
        assert be.last_path == "persistent"
        return
    with pytest.raises(PersistentUnfit, match=rf"CuPy >= 14\.2 .* this is CuPy {re.escape(version)}"):
        xlstm.LSTM(3, 4, backend=be, seed=0).forward(x)
    be.persistent = "auto"              # the stand-in's device picks persistent at H=4: falls back
    y, _ = xlstm.LSTM(3, 4, backend=be, seed=0).forward(x)
    assert be.last_path == "per-step" and not any(n.startswith("lstm_persistent") for n in fake.launches)
