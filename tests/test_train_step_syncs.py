"""The training step does not wait on the device: host syncs and device ops per step, counted.

The counts come from the stand-in cupy (tests/support/standin.py) in counting mode: its
arrays are an ndarray subclass seen as cupy's, whose host reads (asnumpy, .get(), .item(),
float/int/bool, Stream.synchronize) are counted as syncs, and whose ufuncs, reductions, copies,
fancy indexing, GEMMs, raw kernel launches and graph launches are counted as device ops. The
whole step is ``xlstm.app.train.train_step`` (Embedding -> LSTM -> Dense -> cross-entropy -> clip
-> Adam), the code ``xlstm train`` runs.

Per step of the default model scaled down (H=16, E=8, V=20, B=4): 0 syncs (the NaN checks,
id/target range checks, the loss and the clip norm stay on the device until the next log),
and 69 device ops with one layer, 102 with two (zero_grad 1, Embedding 1, LSTM about 35 a
layer, Dense 4 + 7, loss 6 with its kernel, Embedding backward 6, clip 2, Adam 1); neither
depends on T (the LSTM loops are graph-replayed). With graphs off (no nvmath) the eager loop issues 4 ops per time step and layer
(2 cuBLAS GEMMs, 2 fused kernels; T=8: 83, T=16: 115) and fewer copies; still 0 syncs.
Validation reads the device once per evaluation instead of once per window.
The counts are of the CuPy-level operations the code issues (cupy may use more than one
kernel for some, e.g. a reduction); they are not a GPU measurement.
"""
from __future__ import annotations

import numpy as np
import pytest

import xlstm
from support.standin import install_fakes
from xlstm import optim
from xlstm.app import train
from xlstm.errors import InputError
from xlstm.losses import cross_entropy


def _setup(host_lib, monkeypatch, layers=1, H=16, E=8, V=20, flat=True, graphs=True):
    fake = install_fakes(host_lib, monkeypatch, nvmath=graphs, counting=True)
    from xlstm import backends
    be = backends._cupy_backend()
    assert be.graphs_active() == graphs
    model = train.build_model(dict(train.DEFAULTS, hidden=H, layers=layers, embed=E), V, be)
    if flat:
        xlstm.flat.FlatParams(model)
        xlstm.flat.FlatGrads(model)
    return fake, be, model, optim.Adam(model, lr=1e-3)


def _steps(fake, model, opt, T, B=4, V=20, n=3, clip=1.0):
    rng = np.random.default_rng(0)
    carry, per = None, []
    for _ in range(n):
        ids = rng.integers(0, V, (T + 1, B))
        fake.counts.reset()
        loss, norm, carry = train.train_step(model, opt, ids[:-1], ids[1:], carry, clip)
        per.append((fake.counts.total_syncs(), fake.counts.total_ops(), dict(fake.counts.sync_sites)))
    return per, loss, norm


# the design's bound per step, graphs replaying: no sync; ops (one per elementwise op, copy,
# GEMM or graph launch): about 30 for the Embedding, Dense and loss, 2 for the clip, 1 for Adam,
# plus per LSTM layer its graph launches, the input GEMMs, bias and state copies: about 35
OPS_FIRST_LAYER, OPS_PER_LAYER = 75, 40


def test_the_eager_loop_does_not_sync_either(host_lib, monkeypatch, capfd):
    # graphs off (no nvmath): the per-step launches grow with T, the syncs stay at zero
    ops = {}
    for T in (8, 16):
        fake, be, model, opt = _setup(host_lib, monkeypatch, graphs=False)
        with be.deferred():
            per, _, _ = _steps(fake, model, opt, T)
            assert per[-1][0] == 0, per[-1][2]
            ops[T] = per[-1][1]
    assert ops[16] - ops[8] == 8 * 4, ops        # per time step: 2 GEMMs (cuBLAS), 2 fused kernels
    capfd.readouterr()


@pytest.mark.parametrize("T,layers", [(8, 1), (16, 1), (8, 2)])
def test_a_training_step_never_syncs_and_its_ops_do_not_grow_with_T(host_lib, monkeypatch, T, layers):
    fake, be, model, opt = _setup(host_lib, monkeypatch, layers=layers)
    with be.deferred() as reads:
        per, loss, norm = _steps(fake, model, opt, T)
        syncs, ops, sites = per[-1]          # steady state: the graphs are captured
        assert syncs == 0, f"host syncs in a training step at {sites}"
        assert ops <= OPS_FIRST_LAYER + OPS_PER_LAYER * (layers - 1), (ops, dict(fake.counts.ops))
        assert per[-1][1] == per[-2][1]
        fake.counts.reset()
        reads.put("loss", loss)
        reads.put("norm", norm)
        vals = reads.read()             # the natural sync: the values and the queued checks, one transfer
        assert fake.counts.total_syncs() == 1 and all(np.isfinite(list(vals.values())))
        fake.counts.reset()
    assert fake.counts.total_syncs() == 0            # nothing was left to read


def test_the_counter_sees_the_host_reads_it_is_meant_to_prevent(host_lib, monkeypatch):
    # the same step with the host-reading clip and loss: the counter must report them
    fake, be, model, opt = _setup(host_lib, monkeypatch)
    x = np.random.default_rng(1).integers(0, 20, (9, 4))
    model.zero_grad()
    fake.counts.reset()
    logits = model.forward(x[:-1])
    loss, dlogits = cross_entropy(be.asarray(logits), be.asarray(x[1:]))
    model.backward(dlogits)
    optim.clip_grad_norm(model, 1.0)
    s = fake.counts.syncs
    assert s["float"] == 2 and s["bool"] >= 4, dict(s)     # loss, norm; NaN checks, the targets range


def test_flat_adam_is_one_launch_not_a_dozen_per_parameter(host_lib, monkeypatch):
    per = {}
    for flat in (False, True):
        fake, be, model, opt = _setup(host_lib, monkeypatch, flat=flat)
        with be.deferred():
            per[flat] = _steps(fake, model, opt, 8)[0][-1][1]
        if flat:
            assert fake.counts.ops["raw:adam_step_f32"] == 1
    # six parameters: the per-tensor update issues 12 ops for each, the fused one 1 in all
    assert per[False] - per[True] >= 60, per


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_the_adam_kernel_equals_the_numpy_adam_bitwise(host_lib, monkeypatch, dtype, wd):
    # the kernel's host twin (on the stand-in cupy) and the NumPy passes, on the same flat
    # buffers, over steps with gradients from 0 through 1e-30 to 1e30
    fake = install_fakes(host_lib, monkeypatch, nvmath=True, counting=True)
    from xlstm import backends
    be = backends._cupy_backend()
    rng = np.random.default_rng(7)
    shapes = {"a": (5, 3), "b": (7,), "c": (2, 2, 2)}
    n = sum(int(np.prod(s)) for s in shapes.values())

    def views(buf):
        return dict(zip(shapes, xlstm.flat.views(buf, shapes.values())))
    P0 = rng.standard_normal(n).astype(dtype)
    host = (views(P0.copy()), views(np.zeros(n, dtype)))
    dev = (views(be.asarray(P0.copy())), views(be.xp.zeros(n, dtype)))
    o_host = optim.Adam(host, lr=3e-3, weight_decay=wd)
    o_dev = optim.Adam(dev, lr=3e-3, weight_decay=wd)
    for step in range(5):
        g = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 31, n)
        g[::7] = 0
        for params, grads in (host, dev):
            grads["a"].base[...] = g.astype(dtype)
        with np.errstate(over="ignore"):        # g*g of 1e30 overflows to inf in float32: v = inf, d = 0
            o_host.step()
        fake.counts.reset()
        o_dev.step()
        assert fake.counts.ops["raw:adam_step_" + ("f32" if dtype == "float32" else "f64")] == 1
        if step:        # (the first step makes the flat moments)
            assert fake.counts.total_ops() == 1, dict(fake.counts.ops)
        for k in shapes:
            assert np.asarray(host[0][k]).tobytes() == np.asarray(dev[0][k]).view(np.ndarray).tobytes(), (step, k)
            for b in ("exp_avg", "exp_avg_sq"):
                assert o_host.state[k][b].tobytes() == np.asarray(o_dev.state[k][b]).view(np.ndarray).tobytes()


def test_nan_input_on_the_device_still_raises_with_its_name(host_lib, monkeypatch):
    fake, be, model, opt = _setup(host_lib, monkeypatch)
    lstm = model[1]
    x = np.ones((3, 2, 8), np.float32)
    x[1, 0, 2] = np.nan
    with pytest.raises(InputError, match="x contains NaN"):        # not deferred: at once
        lstm.forward(be.asarray(x))
    with pytest.raises(InputError, match="x contains NaN"):
        with be.deferred() as reads:
            fake.counts.reset()
            lstm.forward(be.asarray(x))                            # queued, no sync ...
            assert fake.counts.total_syncs() == 0
            reads.read()                                           # ... read at the natural sync
    with pytest.raises(InputError, match=r"ids must lie in \[0, 20\).*got values in \[0, 25\]"):
        with be.deferred():
            model.forward(be.asarray(np.array([[0, 25]])))
    with pytest.raises(InputError, match=r"targets must lie in \[0, 20\)"):
        with be.deferred():
            cross_entropy(be.asarray(np.zeros((2, 20), np.float32)), be.asarray(np.array([3, -1])))


def test_a_nan_loss_stops_training_at_the_next_read(monkeypatch, tmp_path):
    # the loss of step 5 made NaN: read at the log of step 20, the error names step 5
    import argparse

    import xlstm.losses
    real, calls = xlstm.losses.cross_entropy, []

    def nan_at_5(*a, **k):
        loss, d = real(*a, **k)
        calls.append(1)
        return (loss * np.nan if len(calls) == 5 else loss), d
    monkeypatch.setattr(xlstm.losses, "cross_entropy", nan_at_5)
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_args(["--backend", "numpy", "--max-chars", "20000", "--steps", "40", "--hidden", "8",
                         "--embed", "4", "--no-progress", "--out", str(tmp_path / "r"), "--log-every", "20",
                         "--eval-every", "40", "--save-every", "40", "--seq-len", "8", "--batch", "2"])
    with pytest.raises(xlstm.errors.XlstmError, match=r"training loss became nan at step 5;"):
        train.run(args)
    assert len(calls) == 20          # the run went on to the read, and no checkpoint was written
    assert not list((tmp_path / "r").glob("ckpt-*"))


# -- bitwise equality with the host paths, on NumPy -------------------------------------------
@pytest.mark.parametrize("max_norm", [1e-3, 1e6])
@pytest.mark.parametrize("flat", [False, True])
def test_clip_on_device_equals_the_host_clip_bitwise(max_norm, flat):
    rng = np.random.default_rng(3)
    shapes = [(5, 7), (7,), (3, 4, 2)]
    src = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    def grads():
        if not flat:
            return [a.copy() for a in src]
        buf = np.concatenate([a.ravel() for a in src])
        return xlstm.flat.views(buf, [a.shape for a in src])
    g1, g2 = grads(), grads()
    n1 = optim.clip_grad_norm(g1, max_norm)
    n2 = optim.clip_grad_norm(g2, max_norm, on_device=True)
    assert isinstance(n1, float) and float(n2) == n1
    for a, b in zip(g1, g2):
        assert a.tobytes() == b.tobytes()
    bad = grads()
    bad[1][2] = np.inf
    before = [a.copy() for a in bad]
    assert not np.isfinite(float(optim.clip_grad_norm(bad, 1.0, on_device=True)))
    for a, b in zip(bad, before):            # a non-finite norm leaves the gradients unchanged
        assert a.tobytes() == b.tobytes()


def test_loss_on_device_is_the_same_float():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((6, 3, 11)).astype(np.float32)
    t = rng.integers(0, 11, (6, 3))
    a, da = cross_entropy(logits, t)
    b, db = cross_entropy(logits, t, on_device=True)
    assert float(b) == a and da.tobytes() == db.tobytes()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_flat_adam_equals_the_per_tensor_adam_bitwise(wd):
    def model():
        return xlstm.Sequential(xlstm.Embedding(13, 4, seed=0), xlstm.LSTM(4, 6, seed=0), xlstm.Dense(6, 13, seed=0))
    per, flat = model(), model()
    xlstm.flat.FlatParams(flat)
    xlstm.flat.FlatGrads(flat)
    o1, o2 = optim.Adam(per, lr=1e-2, weight_decay=wd), optim.Adam(flat, lr=1e-2, weight_decay=wd)
    rng = np.random.default_rng(5)
    def step_both(pairs):
        ids = rng.integers(0, 13, (6, 2))
        for m, o in pairs:
            m.zero_grad()
            loss, d = cross_entropy(m.forward(ids[:-1]), ids[1:])
            m.backward(d)
            o.step()
    for step in range(4):
        step_both(((per, o1), (flat, o2)))
        assert getattr(o2, "_flat", None) is not None and getattr(o1, "_flat", None) is None
        for k in per.params:
            assert per.params[k].tobytes() == flat.params[k].tobytes(), (step, k)
    # the optimiser state round-trips: a restored flat optimiser continues bit for bit
    sd = o2.state_dict()
    o3 = optim.Adam(flat, lr=1e-2, weight_decay=wd)
    o3.load_state_dict(sd)
    for k in sd["state"]:
        for b in sd["state"][k]:
            assert sd["state"][k][b].tobytes() == o1.state_dict()["state"][k][b].tobytes()
    step_both(((per, o1), (flat, o3)))
    for k in per.params:
        assert per.params[k].tobytes() == flat.params[k].tobytes(), k


def test_validation_reads_the_device_once_and_sums_as_before(host_lib, monkeypatch):
    fake, be, model, opt = _setup(host_lib, monkeypatch)
    streams = np.random.default_rng(8).integers(0, 20, (3, 30))
    with be.deferred():
        fake.counts.reset()
        total, count = train.eval_sums(model, streams, 8)
        assert fake.counts.total_syncs() == 1, dict(fake.counts.sync_sites)
    # the old host loop: a float per window, added in float64 on the host
    model.eval()
    want, state = 0.0, None
    for p in range(0, 29, 8):
        x, y = streams[:, p:min(p + 8, 29)].T.copy(), streams[:, p + 1:p + 1 + min(8, 29 - p)].T.copy()
        loss, _ = cross_entropy(model.forward(x, state=state), y)
        state = model.last_state
        want += loss * y.size
    assert total == want and count == 3 * 29


def test_zero_grad_fills_the_flat_buffer_once(host_lib, monkeypatch):
    fake, be, model, opt = _setup(host_lib, monkeypatch)
    for g in model.grads.values():
        g[...] = 1
    fake.counts.reset()
    opt.zero_grad()
    assert dict(fake.counts.ops) == {"setitem": 1}
    assert all(not np.asarray(g).view(np.ndarray).any() for g in model.grads.values())


@pytest.fixture
def gpu_be():
    reason = xlstm.backends.cupy_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return xlstm.backends.resolve("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_adam_kernel_equals_cupys_passes_bitwise(gpu_be, monkeypatch, dtype):
    # the fused kernel against the same update as CuPy elementwise passes (the op's NumPy
    # implementation, ``adam.passes``, run on CuPy arrays), values in the normal range (the GPU
    # flushes float32 denormals to zero in the kernel)
    from xlstm.ops import adam

    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(gpu_be, "adam_step", lambda *a: adam.passes(gpu_be, *a))
        model = xlstm.Sequential(xlstm.Embedding(13, 4, seed=0, dtype=dtype, backend=gpu_be),
                                 xlstm.Dense(4, 13, seed=0, dtype=dtype, backend=gpu_be))
        xlstm.flat.FlatParams(model)
        xlstm.flat.FlatGrads(model)
        opt = optim.Adam(model, lr=1e-2, weight_decay=0.01)
        r = np.random.default_rng(9)
        for _ in range(3):
            for g in model.grads.values():
                g[...] = gpu_be.asarray(r.standard_normal(g.shape).astype(dtype))
            opt.step()
        runs.append({k: gpu_be.to_numpy(v) for k, v in model.params.items()})
    for k in runs[0]:
        assert runs[0][k].tobytes() == runs[1][k].tobytes(), k


@pytest.mark.gpu
def test_gpu_training_steps_queue_and_read_at_the_log(gpu_be):
    # a few steps of the language model on the device: the losses read in one transfer are the
    # losses of the NumPy run to float32 tolerance (the kernels' tanh/exp differ in the last bits)
    rng = np.random.default_rng(10)
    ids = [rng.integers(0, 20, (9, 4)) for _ in range(4)]
    out = {}
    for be in ("numpy", gpu_be):
        b = xlstm.backends.resolve(be)
        model = train.build_model(dict(train.DEFAULTS, hidden=16, embed=8), 20, b)
        xlstm.flat.FlatParams(model)
        xlstm.flat.FlatGrads(model)
        opt = optim.Adam(model, lr=1e-3)
        carry = None
        with b.deferred() as reads:
            for i, x in enumerate(ids):
                loss, norm, carry = train.train_step(model, opt, x[:-1], x[1:], carry, 1.0)
                reads.put(i, loss)
            out[b.name] = list(reads.read().values())
    np.testing.assert_allclose(out["cupy"], out["numpy"], rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["clip", "below", "inf", "nan"])
def test_clip_kernels_on_the_flat_buffer(host_lib, monkeypatch, dtype, case):
    # CuPy's clip: grad_norm (float64 sum of squares, fixed order) + clip_by_norm, 2 launches,
    # run by their host twins; norm against a float64 reference, scaling against its definition
    fake = install_fakes(host_lib, monkeypatch, nvmath=True, counting=True)
    from xlstm import backends
    be = backends._cupy_backend()
    rng = np.random.default_rng(11)
    g0 = (rng.standard_normal(1000) * 3).astype(dtype)           # more elements than threads
    g0[5] = {"inf": np.inf, "nan": np.nan}.get(case, g0[5])
    max_norm = 1e6 if case == "below" else 1.0
    buf = be.asarray(g0.copy())
    views = xlstm.flat.views(buf, [(20, 15), (1,), (699,)])
    fake.counts.reset()
    total = optim.clip_grad_norm(views, max_norm, on_device=True)
    sfx = "f32" if dtype == "float32" else "f64"
    assert dict(fake.counts.ops) == {f"raw:grad_norm_{sfx}": 1, f"raw:clip_by_norm_{sfx}": 1}
    assert fake.counts.total_syncs() == 0
    t = np.asarray(total).view(np.ndarray).item()
    got = np.asarray(buf).view(np.ndarray)
    if case in ("inf", "nan"):
        assert not np.isfinite(t)
        assert got.tobytes() == g0.tobytes()          # unchanged
        return
    want = float(np.sqrt(np.sum(g0.astype(np.float64) ** 2)))
    assert abs(t - want) <= 1e-13 * want
    if case == "below":
        assert got.tobytes() == g0.tobytes()
    else:
        assert got.tobytes() == (g0 * np.dtype(dtype).type(max_norm / t)).tobytes()
        assert abs(np.linalg.norm(got.astype(np.float64)) - max_norm) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_clip_kernels_match_the_numpy_clip(gpu_be, dtype):
    rng = np.random.default_rng(12)
    g0 = (rng.standard_normal(100_003) * 3).astype(dtype)
    host = [g0.copy()]
    n1 = optim.clip_grad_norm(host, 1.0)
    dev = gpu_be.asarray(g0.copy())
    n2 = optim.clip_grad_norm(xlstm.flat.views(dev, [(3,), (g0.size - 3,)]), 1.0, on_device=True)
    # NumPy sums 100k float32 squares in float32 (rounding ~sqrt(n) eps), the kernel in float64
    tol = {"float32": 1e-4, "float64": 1e-12}[dtype]
    assert abs(float(n2) - n1) <= tol * n1
    np.testing.assert_allclose(gpu_be.to_numpy(dev), host[0], rtol=tol, atol=tol * np.abs(host[0]).max())
    again = gpu_be.asarray(g0.copy())             # a fixed order: the same bits every time
    n3 = optim.clip_grad_norm(xlstm.flat.views(again, [(3,), (g0.size - 3,)]), 1.0, on_device=True)
    assert float(n3) == float(n2) and gpu_be.to_numpy(again).tobytes() == gpu_be.to_numpy(dev).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("V", [1, 7, 300, 600])
def test_the_cross_entropy_kernel_matches_numpy(host_lib, monkeypatch, dtype, V):
    # CuPy's loss as one kernel (its host twin: the rows' thread partials and trees), against
    # the NumPy lines it replaces; wide logits, more classes than threads, one class
    fake = install_fakes(host_lib, monkeypatch, nvmath=True, counting=True)
    from xlstm import backends
    be = backends._cupy_backend()
    rng = np.random.default_rng(13)
    logits = (rng.standard_normal((5, 3, V)) * 30).astype(dtype)
    t = rng.integers(0, V, (5, 3))
    want, dwant = cross_entropy(logits, t)
    with be.deferred():
        fake.counts.reset()
        got, dgot = cross_entropy(be.asarray(logits), be.asarray(t), on_device=True)
        assert fake.counts.ops[f"raw:softmax_xent_{'f32' if dtype == 'float32' else 'f64'}"] == 1
        # the kernel, the mean (sum, float64, / count), the queued NaN and range checks
        assert fake.counts.total_syncs() == 0 and fake.counts.total_ops() <= 12, (dict(fake.counts.ops), fake.counts.sync_sites)
    tol = {"float32": 2e-6, "float64": 1e-13}[dtype]
    assert abs(float(got) - want) <= tol * max(1.0, abs(want))
    d = np.asarray(dgot).view(np.ndarray)
    assert d.shape == dwant.shape and np.max(np.abs(d - dwant)) <= tol * np.max(np.abs(dwant))


def test_the_cross_entropy_kernel_never_reads_past_a_row(host_lib, monkeypatch):
    # a target out of range: no read out of bounds (NaN loss), and the deferred check names it
    install_fakes(host_lib, monkeypatch, nvmath=True, counting=True)
    from xlstm import backends
    be = backends._cupy_backend()
    with pytest.raises(InputError, match=r"targets must lie in \[0, 4\).*\[0, 9\]"):
        with be.deferred():
            loss, _ = cross_entropy(be.asarray(np.zeros((2, 4), np.float32)), be.asarray(np.array([0, 9])),
                                    on_device=True)
            assert np.isnan(np.asarray(loss).view(np.ndarray))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpu_cross_entropy_kernel_matches_numpy(gpu_be, dtype):
    rng = np.random.default_rng(14)
    logits = (rng.standard_normal((64, 32, 97)) * 5).astype(dtype)
    t = rng.integers(0, 97, (64, 32))
    want, dwant = cross_entropy(logits, t)
    got, dgot = cross_entropy(gpu_be.asarray(logits), gpu_be.asarray(t), on_device=True)
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    assert abs(float(got) - want) <= tol * abs(want)
    d = gpu_be.to_numpy(dgot)
    assert np.max(np.abs(d - dwant)) <= tol * np.max(np.abs(dwant))
    again = cross_entropy(gpu_be.asarray(logits), gpu_be.asarray(t), on_device=True)
    assert float(again[0]) == float(got) and gpu_be.to_numpy(again[1]).tobytes() == d.tobytes()
