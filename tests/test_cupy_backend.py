"""The CuPy backend: what it says where it cannot run, its launches, and CuPy-vs-NumPy equality.

Three groups:

* CPU, always: ``set_backend("cupy")`` on a machine without a usable GPU raises
  BackendUnavailableError with the reason; ``auto`` falls back to NumPy; ``xlstm info`` says why.
* CPU, always (where g++ exists): ``CupyBackend`` itself, unchanged, runs against a stand-in
  ``cupy`` module whose RawModule launches the host twins of the kernels
  (``tests/kernels_host_shim.cpp``) and whose arrays are NumPy's. This checks every launch of
  the backend (argument count, order and C types read from the .cu source, NULL for absent
  masks, dtype-typed scalars, contiguity, block sizes) and runs whole LSTMs through it against
  the NumPy backend. Only the device itself (NVRTC's binary, cuBLAS) is not exercised.
* ``@pytest.mark.gpu``: the same comparisons on a real GPU (skipped with the reason elsewhere,
  by tests/conftest.py): pointwise steps and full LSTMs (layers {1,2}, bidirectional, lengths,
  zoneout + recurrent dropout with shared masks, layer norm), every output, state, dx and
  gradient, float64 to 1e-10 and float32 to 1e-5, normwise max|a-b| / max|b|.
"""
from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import kernels_host_lib
import xlstm
from xlstm.backends import NumpyBackend, cupy_unavailable_reason, resolve
from xlstm.errors import BackendUnavailableError, InputError

TOL = {"float64": 1e-10, "float32": 1e-5}


def normwise(a, b) -> float:
    """max|a-b| / max|b| (max|a-b| when b is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def assert_close(what, got, want, dtype):
    dtype = np.dtype(dtype).name
    e = normwise(got, want)
    assert e <= TOL[dtype], f"{what} ({dtype}): normwise error {e:.3g} > {TOL[dtype]:g}"


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
    assert "cupy unavailable" in out.stderr          # 'auto' says which it chose, and why


@no_gpu
def test_info_reports_why_cupy_is_unavailable():
    out = subprocess.run([sys.executable, "-m", "xlstm", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("cupy")]
    assert line and "unavailable" in line[0] and cupy_unavailable_reason() in line[0]


# =============================================================================================
# 2. CupyBackend's launches on the host (a stand-in cupy module)
# =============================================================================================
class _HostKernel:
    """A RawKernel stand-in: checks a launch against the kernel's C signature, runs host_K."""

    def __init__(self, fake, name, params):
        self.fake, self.name, self.params = fake, name, params

    def __call__(self, grid, block, args, **kwargs):
        assert not kwargs, f"{self.name}: unexpected launch options {kwargs}"
        assert isinstance(grid, tuple) and isinstance(block, tuple), "grid and block must be tuples"
        assert grid[0] >= 1 and 1 <= block[0] <= 1024, (grid, block)
        if self.name.startswith("ln_lstm"):
            assert block[0] % 32 == 0, f"{self.name}: row blocks need a multiple of 32 threads"
        assert len(args) == len(self.params), \
            f"{self.name}: {len(args)} arguments for {len(self.params)} parameters"
        cargs = []
        for (ptr, base, pname), a in zip(self.params, args):
            want = kernels_host_lib.numpy_type(base)
            if ptr:
                if isinstance(a, np.ndarray):
                    assert a.dtype == want, f"{self.name}({pname}): dtype {a.dtype}, kernel takes {base}*"
                    assert a.flags.c_contiguous, f"{self.name}({pname}): not C-contiguous"
                    cargs.append(a.ctypes.data)
                else:
                    assert type(a) is np.uint64 and a == 0, \
                        f"{self.name}({pname}): {a!r} is neither an array nor a NULL pointer"
                    cargs.append(None)
            else:
                assert type(a) is want, f"{self.name}({pname}): {type(a).__name__}, kernel takes {base}"
                cargs.append(a.item())
        self.fake.launches.append(self.name)
        getattr(self.fake.lib, "host_" + self.name)(*cargs)


class _HostModule:
    """A RawModule stand-in: the kernels of the source it is given, run on the host."""

    def __init__(self, fake, code, options=()):
        assert "-use_fast_math" not in options and "--use_fast_math" not in options
        self.fake, self.sigs = fake, kernels_host_lib.kernel_signatures(code)
        fake.modules.append((code, tuple(options)))

    def get_function(self, name):
        assert name in self.sigs, f"no kernel {name!r} in the source given to RawModule"
        return _HostKernel(self.fake, name, self.sigs[name])


def make_fake_cupy(lib):
    """A stand-in for the ``cupy`` module: NumPy arrays, host kernels, a NumPy gemm."""
    fake = types.SimpleNamespace()
    fake.lib, fake.launches, fake.modules, fake.gemms = lib, [], [], []

    class FakeCupy(types.ModuleType):
        def __getattr__(self, name):          # everything else is NumPy's
            return getattr(np, name)

    mod = FakeCupy("cupy")
    mod.ndarray = np.ndarray
    mod.asnumpy = np.array                    # a host copy, as cupy.asnumpy from a device
    mod.RawModule = lambda code, options=(), **kw: _HostModule(fake, code, options)
    mod.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0),
        Device=lambda i=0: types.SimpleNamespace(attributes={"MultiProcessorCount": 2}),
        get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None))

    def gemm(transa, transb, a, b, out=None, alpha=1.0, beta=0.0):
        # cupy.cublas.gemm's contract: out = alpha op(a) @ op(b) + beta out, operands C- or
        # F-contiguous 2-D (transposed views are passed to cuBLAS as flags)
        assert (transa, transb) == ("N", "N") and out is not None
        for x in (a, b, out):
            assert x.ndim == 2 and (x.flags.c_contiguous or x.flags.f_contiguous)
        fake.gemms.append((a.shape, b.shape))
        out[...] = alpha * (a @ b) + beta * out
        return out

    mod.cublas = types.SimpleNamespace(gemm=gemm)
    fake.module = mod
    return fake


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return kernels_host_lib.build_or_skip(tmp_path_factory, "host_kernels_cupy")


@pytest.fixture
def emulated(host_lib, monkeypatch):
    """(CupyBackend running on the host, the fake module's records)."""
    from xlstm.backends.cupy_backend import CupyBackend

    fake = make_fake_cupy(host_lib)
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    return CupyBackend(), fake


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


# -- the emulated tests -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (4, 33)])
def test_emulated_steps_match_numpy(emulated, dtype, kind, B, H):
    be, fake = emulated
    compare_steps(be, np.dtype(dtype).type, B, H, kind)
    assert fake.launches, "no kernel was launched"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", CONFIGS, ids=CONFIG_IDS)
def test_emulated_models_match_numpy(emulated, dtype, name, kwargs, use_lengths):
    be, fake = emulated
    compare_models(be, dtype, kwargs, use_lengths)
    assert fake.gemms, "matmul_add did not reach cuBLAS's gemm"


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
        raise AssertionError("xp.add.at on the training path: CuPy runs it with atomics (issue 9)")


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
