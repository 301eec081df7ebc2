"""CUDA-graph replay of the CuPy backend's sequence ops, proven on the CPU, then on a GPU.

On the CPU the CuPy backend runs unchanged against the stand-in cupy of
tests/support/standin.py (host builds of the kernels) and a stand-in of nvmath's cuBLAS
binding that computes the column-major BLAS contract on raw addresses. Stream capture there
RECORDS each kernel launch and GEMM with the addresses it was given and runs nothing;
``Graph.launch`` reruns the records. So a graph bound to the wrong buffer (an input not copied
in, an output not copied out, a caller's array baked in) computes on stale memory and the
"second call with different inputs" checks below fail; allocation, a device sync, cupy's own
cuBLAS or work on another stream during capture raise, as on a device.

What the CPU cannot show: NVRTC's binary, cuBLAS itself, the driver's graph instantiation and
any speed. The ``gpu`` tests at the end run the same comparisons on a device.
"""
from __future__ import annotations

import numpy as np
import pytest

import xlstm
from support.compare import CONFIG_IDS, CONFIGS, compare_models
from support.standin import CaptureViolation, install_fakes
from xlstm.backends import cupy_unavailable_reason


@pytest.fixture
def graphed(host_lib, monkeypatch):
    """(a CupyBackend on the stand-in cupy + nvmath, graphs on; the stand-in's records)."""
    from xlstm.backends.cupy_backend import CupyBackend

    fake = install_fakes(host_lib, monkeypatch, nvmath=True)
    monkeypatch.delenv("XLSTM_CUDA_GRAPHS", raising=False)
    be = CupyBackend()
    assert be.cuda_graphs and be.graphs_active()
    yield be, fake
    # a capture that failed falls back to the eager loop: results stay right, so a test would
    # not notice that its graphs never ran; every capture here must have succeeded
    assert be.graphs.failure is None, be.graphs.failure


def _run(be, dtype, kwargs, use_lengths, seed, T=5, B=3, D=4, H=6, masks=None, model=None, model_seed=1):
    """forward + backward of a seeded model on ``be``: every output, state, dx and gradient."""
    rng = np.random.default_rng(seed)
    m = model or xlstm.LSTM(D, H, dtype=dtype, seed=model_seed, backend=be, **kwargs)
    m.zero_grad()
    S = (m.num_layers * m.num_directions, B, H)
    x = rng.standard_normal((T, B, D)).astype(dtype)
    h0, c0 = (rng.standard_normal(S).astype(dtype) * 0.5 for _ in range(2))
    lengths = np.array([T, max(1, T - 2), 1][:B]) if use_lengths else None
    dy = rng.standard_normal((T, B, H * m.num_directions)).astype(dtype)
    dhn, dcn = (rng.standard_normal(S).astype(dtype) for _ in range(2))
    y, (hn, cn) = m.forward(x, state=(h0, c0), lengths=lengths, masks=masks)
    used = m.last_masks
    dx, (dh0, dc0) = m.backward(dy, dstate=(dhn, dcn))
    out = dict(y=y, hn=hn, cn=cn, dx=dx, dh0=dh0, dc0=dc0)
    out.update({"grad " + k: v for k, v in m.grads.items()})
    return {k: np.array(v) for k, v in out.items()}, used, m


def _assert_bitwise(got, want, what):
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), \
            f"{what}: {k} differs (max |diff| {np.max(np.abs(got[k] - want[k])):.3g})"


# -- replay == eager, bitwise; new inputs give the new answer ----------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", CONFIGS, ids=CONFIG_IDS)
def test_replay_equals_eager_bitwise(graphed, dtype, name, kwargs, use_lengths):
    be, fake = graphed
    graphed_model = None
    # capture, replay with new inputs, replay with new inputs and a new model (other weights)
    for call, (seed, model_seed) in enumerate(((11, 1), (12, 1), (13, 2))):
        if call == 2:
            graphed_model = None
        got, masks, graphed_model = _run(be, dtype, kwargs, use_lengths, seed, model=graphed_model,
                                         model_seed=model_seed)
        be.cuda_graphs = False
        try:
            want, _, _ = _run(be, dtype, kwargs, use_lengths, seed, masks=masks, model_seed=model_seed)
        finally:
            be.cuda_graphs = True
        _assert_bitwise(got, want, f"call {call}")
        if call == 0:       # layers and directions of one shape share a graph: 2 (or 4) ops
            captured = be.graphs.captures
            assert captured >= 2
    # every later call of the same shapes was served by the cached graphs, nothing re-captured
    assert be.graphs.captures == captured and be.graphs.replays >= 2 * captured
    st = be.graphs.stats()
    assert st["entries"] == captured and st["bytes"] > 0


def test_replay_matches_the_numpy_backend(graphed):
    # independent of the cupy code's own eager loop: the NumPy backend's answer
    be, _ = graphed
    for name, kwargs, use_lengths in CONFIGS:
        compare_models(be, "float64", kwargs, use_lengths, H=7)
        compare_models(be, "float64", kwargs, use_lengths, H=7, seed=6)   # replayed
    assert be.graphs.replays > 0


def test_captured_graph_is_one_gemm_and_one_kernel_per_step(graphed):
    be, fake = graphed
    T = 4
    m = xlstm.LSTM(3, 5, backend=be, seed=0)
    x = np.random.default_rng(0).standard_normal((T, 2, 3)).astype(np.float32)
    y, _ = m.forward(x)
    m.backward(np.ones_like(y))
    assert fake.captured == [["gemm", "lstm_forward_step_f32"] * T,
                             ["lstm_backward_step_f32", "gemm"] * T]
    n_launches = len(fake.launched)
    fake.launches.clear()
    y, _ = m.forward(x)
    m.backward(np.ones_like(y))
    # replays: one graph launch per op; the host issued no step launch of its own
    assert len(fake.launched) == n_launches + 2 and len(fake.captured) == 2
    assert fake.launches == []


def test_a_binding_left_out_is_caught(graphed, monkeypatch):
    """The stand-in must not be able to pass a wrong binding: drop the copy-in of the gates
    (x@W + b) and the second call, with new inputs, must come out wrong."""
    from xlstm.backends import cuda_graphs

    be, _ = graphed
    spec = dict(cuda_graphs.SPECS["lstm_forward_sequence"])
    spec["read"] = {k: v for k, v in spec["read"].items() if k != "gates"}
    monkeypatch.setitem(cuda_graphs.SPECS, "lstm_forward_sequence", spec)
    _run(be, "float64", {}, False, 1)
    got, masks, _ = _run(be, "float64", {}, False, 2)
    be.cuda_graphs = False
    want, _, _ = _run(be, "float64", {}, False, 2, masks=masks)
    assert not np.array_equal(got["y"], want["y"])


# -- the cache, the switches, traces ---------------------------------------------------------------
def test_lru_cache_is_bounded(graphed):
    be, _ = graphed
    be.graphs.maxsize = 2
    m = xlstm.LSTM(3, 4, backend=be, seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    for T in (2, 3, 4):                       # three forward shapes through a cache of two
        m.forward(rng.standard_normal((T, 2, 3)))
    assert len(be.graphs) == 2 and be.graphs.captures == 3
    assert [k[1][1][0] for k in be.graphs.keys()] == [3, 4]     # T of gates: the oldest went
    m.forward(rng.standard_normal((2, 2, 3)))                    # evicted: captured again
    assert be.graphs.captures == 4 and len(be.graphs) == 2
    m.forward(rng.standard_normal((4, 2, 3)))                    # still cached: replayed
    assert be.graphs.captures == 4 and be.graphs.replays == 1


def test_each_device_gets_its_own_graph(graphed, monkeypatch):
    # a graph's buffers and kernels live on the device current at capture: the same shape on
    # another device must be captured there, not replayed from the first device's graph
    be, fake = graphed
    m = xlstm.LSTM(3, 4, backend=be, seed=0, dtype="float64")
    x = np.ones((3, 2, 3))
    m.forward(x)
    assert be.graphs.captures == 1
    monkeypatch.setattr(fake.module.cuda.runtime, "getDevice", lambda: 1)
    m.forward(x)
    assert be.graphs.captures == 2 and be.graphs.replays == 0
    assert sorted(k[-1] for k in be.graphs.keys()) == [("device", 0), ("device", 1)]


def test_opt_out_by_environment_and_attribute(host_lib, monkeypatch, graphed):
    from xlstm.backends.cupy_backend import CupyBackend

    be, fake = graphed
    monkeypatch.setenv("XLSTM_CUDA_GRAPHS", "0")
    off = CupyBackend()
    assert off.cuda_graphs is False and not off.graphs_active()
    m = xlstm.LSTM(3, 4, backend=off, seed=0)
    y, _ = m.forward(np.ones((3, 2, 3), np.float32))
    m.backward(np.ones_like(y))
    assert fake.captured == [] and len(off.graphs) == 0
    assert fake.launches.count("lstm_forward_step_f32") == 3      # the eager loop ran
    be.cuda_graphs = False                                         # the attribute switch
    xlstm.LSTM(3, 4, backend=be, seed=0).forward(np.ones((3, 2, 3), np.float32))
    assert fake.captured == []
    monkeypatch.setenv("XLSTM_CUDA_GRAPHS", "maybe")
    with pytest.raises(xlstm.InputError, match="XLSTM_CUDA_GRAPHS"):
        CupyBackend()


def test_traces_run_eagerly(graphed):
    be, fake = graphed
    for layer_norm in (False, True):
        m = xlstm.LSTM(3, 4, backend=be, seed=0, dtype="float64", layer_norm=layer_norm)
        y, _ = m.forward(np.ones((3, 2, 3)), trace=True)
        m.backward(np.ones_like(y), trace=True)
        m.last_trace.check(1e-9)
        assert "l0/fw/t2/dCt" in m.last_trace
    assert fake.captured == [] and be.graphs.captures == 0
    m.forward(np.ones((3, 2, 3)))                 # untraced again: captures
    assert be.graphs.captures == 1
    with be.eager():
        assert not be.graphs_active()
    assert be.graphs_active()


def test_without_nvmath_the_eager_loop_runs_and_says_so_once(host_lib, monkeypatch, capfd):
    from xlstm.backends import cupy_backend

    fake = install_fakes(host_lib, monkeypatch, nvmath=False)
    monkeypatch.setattr(cupy_backend, "_graphs_note_shown", False)
    be = cupy_backend.CupyBackend()
    assert be.cuda_graphs and not be.graphs_active()
    for _ in range(2):
        xlstm.LSTM(3, 4, backend=be, seed=0).forward(np.ones((3, 2, 3), np.float32))
    err = capfd.readouterr().err
    assert err.count("CUDA graphs are off") == 1 and "nvmath-python" in err
    assert fake.captured == [] and len(fake.gemms) == 6            # cupy's cuBLAS, eagerly


def test_nothing_in_the_capture_synchronises_or_allocates(graphed):
    # the stand-in raises on a sync, an allocation, cupy's cuBLAS or another stream during
    # capture; a model with every option exercising every op must capture cleanly
    be, fake = graphed
    _run(be, "float32", dict(num_layers=2, bidirectional=True, layer_norm=True, zoneout=0.2,
                             recurrent_dropout=0.2), True, 3)
    assert len(fake.captured) == 2          # LN forward and backward: all 4 layer-directions share them
    stream = fake.module.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(CaptureViolation, match="synchronize"):
            be.synchronize()
        with pytest.raises(CaptureViolation, match="allocation"):
            fake.module.empty(3)
        with pytest.raises(NotImplementedError):
            fake.module.cublas.gemm("N", "N", np.ones((1, 1)), np.ones((1, 1)), out=np.ones((1, 1)))
        stream.end_capture()


def test_the_stand_in_refuses_every_other_cupy_op_inside_a_capture(graphed):
    """Real CUDA records a copy, fill or elementwise kernel issued during capture; the stand-in
    would run it at once on the host and drop it from the replay. So it refuses each one (a
    BaseException, which the backend's capture fallback cannot swallow), and outside a capture
    the same ops run."""
    be, fake = graphed
    cp = fake.module
    a, b = cp.zeros((4, 3), np.float32), cp.ones((4, 3), np.float32)
    ops = {"setitem": lambda: a.__setitem__(0, 1.0), "slice assignment": lambda: a.__setitem__(..., b),
           "+=": lambda: a.__iadd__(b), "ufunc": lambda: cp.tanh(a, out=a), "binary op": lambda: a + b,
           "reduction": lambda: a.sum(), "copy": lambda: a.copy(), "astype": lambda: a.astype(np.float64),
           "fill": lambda: a.fill(2.0), "gather": lambda: a[np.array([0, 2])], "where": lambda: cp.where(a > 0, a, b),
           "allocation": lambda: cp.empty_like(a), "asarray": lambda: cp.asarray(np.ones(3)),
           "host read": lambda: float(a[0, 0]), "asnumpy": lambda: cp.asnumpy(a),
           "array function": lambda: np.concatenate([a, b])}
    stream = cp.cuda.Stream(non_blocking=True)
    for what, op in ops.items():
        with stream:
            stream.begin_capture()
            try:
                with pytest.raises(CaptureViolation, match="during stream capture"):
                    op()
            finally:
                stream.end_capture()
        assert not np.any(np.isnan(np.asarray(a))), what
    view = a[1:3]                               # views and the address are no ops
    assert view.data.ptr == a.data.ptr + 3 * 4
    for what, op in ops.items():                # outside a capture each one runs
        op()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cublas_gemm_layouts(graphed, dtype):
    """CublasGemm's row-major mapping (op flags, dimensions, leading dimensions) against NumPy,
    for C- and F-contiguous operands, through the column-major stand-in of cuBLAS."""
    be, fake = graphed
    dev = fake.module.asarray
    rng = np.random.default_rng(0)
    for m, k, n in ((3, 4, 5), (1, 6, 2), (4, 1, 3), (2, 3, 1)):
        a0, b0 = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
        for a in (dev(a0), dev(np.asfortranarray(a0))):
            for b in (dev(b0), dev(np.asfortranarray(b0))):
                out = dev(rng.standard_normal((m, n)).astype(dtype))
                want = out.astype(np.float64) + a0.astype(np.float64) @ b0.astype(np.float64)
                be.matmul_add(a, b, out)
                assert np.allclose(out, want, rtol=1e-5, atol=1e-5), (m, k, n, a.flags.f_contiguous)
    assert fake.gemms and all(g[0] == "nvmath" for g in fake.gemms)


# -- on a GPU -------------------------------------------------------------------------------------
@pytest.fixture
def gpu_be():
    reason = cupy_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from xlstm.backends import resolve

    be = resolve("cupy")
    if be._gemm() is None:
        pytest.skip("nvmath-python is not installed: no CUDA-graph path to test")
    return be


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,use_lengths", CONFIGS, ids=CONFIG_IDS)
def test_gpu_replay_equals_eager_bitwise(gpu_be, dtype, name, kwargs, use_lengths):
    be = gpu_be
    prev, be.cuda_graphs = be.cuda_graphs, True
    try:
        model = None
        for seed in (21, 22, 23):
            got, masks, model = _run(be, dtype, kwargs, use_lengths, seed, T=7, B=5, D=6, H=40, model=model)
            be.cuda_graphs = False
            want, _, _ = _run(be, dtype, kwargs, use_lengths, seed, T=7, B=5, D=6, H=40, masks=masks)
            be.cuda_graphs = True
            _assert_bitwise(got, want, f"seed {seed}")
        assert be.graphs.replays > 0
    finally:
        be.cuda_graphs = prev


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_gpu_precision_replay_equals_eager_bitwise(gpu_be, mode, layer_norm):
    """cublasGemmEx and the bf16 cast captured and replayed: bitwise equal to the eager loop."""
    be = gpu_be
    prev, be.cuda_graphs = be.cuda_graphs, True
    try:
        model = None
        for seed, model_seed in ((21, 1), (22, 1), (23, 2)):
            model = None if model_seed == 2 else model
            got, _, model = _run_mode(be, mode, layer_norm, seed, model_seed, model)
            be.cuda_graphs = False
            want, _, _ = _run_mode(be, mode, layer_norm, seed, model_seed)
            be.cuda_graphs = True
            _assert_bitwise(got, want, f"{mode} seed {seed}")
        assert be.graphs.replays > 0
    finally:
        be.cuda_graphs = prev


@pytest.mark.gpu
def test_gpu_graphed_models_match_numpy(gpu_be):
    for name, kwargs, use_lengths in CONFIGS:
        for seed in (5, 6):
            compare_models(gpu_be, "float64", kwargs, use_lengths, seed=seed)



def test_scalars_select_the_graph(graphed):
    # forget_bias and eps are baked into the captured launches: a model of the same shape with
    # other values must get its own graph, not replay the first one's
    be, _ = graphed
    for kwargs in (dict(forget_bias=1.0), dict(forget_bias=0.0), dict(layer_norm=True, layer_norm_eps=1e-3),
                   dict(layer_norm=True, layer_norm_eps=1e-12)):
        got, masks, _ = _run(be, "float64", kwargs, False, 4)
        be.cuda_graphs = False
        want, _, _ = _run(be, "float64", kwargs, False, 4, masks=masks)
        be.cuda_graphs = True
        _assert_bitwise(got, want, str(kwargs))
    assert be.graphs.captures == 6      # the backward ops take neither scalar: shared


def test_bench_reports_the_first_call_and_graph_memory(graphed, monkeypatch):
    import argparse

    from xlstm import bench
    from xlstm.bench.machine import cupy_first_call

    be, _ = graphed
    used = [0]
    monkeypatch.setattr(be.xp, "get_default_memory_pool",
                        lambda: type("Pool", (), {"used_bytes": lambda self: used[0]})(), raising=False)
    m = xlstm.LSTM(3, 4, backend=be, seed=0)
    x = np.ones((3, 2, 3), np.float32)

    def step():
        y, _ = m.forward(x)
        m.backward(np.ones_like(y))
        used[0] += 1 << 20

    first = cupy_first_call(be, step)
    assert first["cuda_graphs"] == "on" and first["graph_capture_s"] > 0
    assert first["graph_mb"] == be.graphs.stats()["bytes"] / 2 ** 20 > 0
    assert first["pool_growth_mb"] == 1.0 and first["first_step_ms"] > 0
    again = cupy_first_call(be, step)                     # replayed: nothing new
    assert again["graph_mb"] == 0 and again["graph_capture_s"] == 0
    be.cuda_graphs = False
    assert cupy_first_call(be, step)["cuda_graphs"] == "off"
    args = argparse.ArgumentParser()
    bench.add_arguments(args)
    assert args.parse_args(["--cuda-graphs", "off"]).cuda_graphs == "off"
    assert args.parse_args([]).cuda_graphs is None


def test_an_error_inside_the_capture_ends_it_and_caches_nothing(graphed):
    be, fake = graphed
    T, B, H = 3, 2, 4
    gates = np.zeros((T, B, 4 * H), np.float32)
    hs, cs = np.zeros((T + 1, B, H), np.float32), np.zeros((T + 1, B, H), np.float32)
    U = np.zeros((H, 4 * H), np.float32)
    with pytest.raises(xlstm.InputError, match="mask has dtype float64"):
        be.lstm_forward_sequence(gates, hs, cs, U, 1.0, mask=np.ones((T, B)))
    assert fake.capturing is None and len(be.graphs) == 0
    be.lstm_forward_sequence(gates, hs, cs, U, 1.0, mask=np.ones((T, B), np.float32))   # still works
    assert len(be.graphs) == 1 and np.all(hs[1:] == 0)


@pytest.mark.parametrize("where", ["capture", "first launch"])
def test_a_failed_capture_warns_once_and_runs_eagerly_bitwise(host_lib, monkeypatch, capfd, where):
    """A device that refuses the capture (or the captured graph's first launch) does not end
    the run: the backend says why once, turns graphs off and runs the eager loop, whose results
    are bitwise those of a backend that never had graphs on."""
    from support import standin
    from xlstm.backends.cupy_backend import CupyBackend

    fake = install_fakes(host_lib, monkeypatch, nvmath=True)
    monkeypatch.delenv("XLSTM_CUDA_GRAPHS", raising=False)
    why = "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing"
    if where == "capture":
        real_end = standin._FakeStream.end_capture

        def refuse(self):
            real_end(self)
            raise RuntimeError(why)
        monkeypatch.setattr(standin._FakeStream, "end_capture", refuse)
    else:
        def refuse(self, stream=None):
            raise RuntimeError(why)
        monkeypatch.setattr(standin._FakeGraph, "launch", refuse)
    be = CupyBackend()
    assert be.graphs_active()
    kwargs = dict(num_layers=2, bidirectional=True, zoneout=0.2)
    got = [_run(be, "float32", kwargs, True, seed) for seed in (3, 4)]
    assert not be.cuda_graphs and why in be.graphs.failure and len(be.graphs) == 0
    assert fake.capturing is None
    err = capfd.readouterr().err
    assert err.count("CUDA graph capture failed") == 1 and why in err
    eager = CupyBackend()
    eager.cuda_graphs = False
    for seed, (out, masks, _) in zip((3, 4), got):
        want, _, _ = _run(eager, "float32", kwargs, True, seed, masks=masks)
        _assert_bitwise(out, want, f"seed {seed}")


# -- precision modes (tf32/bf16 through CublasGemm.gemm_ex) under graph replay ---------------------
def _run_mode(be, mode, layer_norm, seed, model_seed=1, model=None):
    m = model or xlstm.LSTM(4, 6, num_layers=2, layer_norm=layer_norm, seed=model_seed, backend=be)
    m.precision = mode
    return _run(be, "float32", {}, False, seed, model=m)


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_precision_replay_equals_eager_bitwise(graphed, mode, layer_norm):
    """Captured on the first call (the bf16 cast's scratch must exist before capture: the
    stand-in refuses allocation there), replayed with new inputs and with new weights (the
    rounded U / U^T is a graph input), each bitwise equal to the eager loop."""
    be, fake = graphed
    model = None
    for call, (seed, model_seed) in enumerate(((11, 1), (12, 1), (13, 2))):
        if call == 2:
            model = None
        got, _, model = _run_mode(be, mode, layer_norm, seed, model_seed, model)
        be.cuda_graphs = False
        try:
            want, _, _ = _run_mode(be, mode, layer_norm, seed, model_seed)
        finally:
            be.cuda_graphs = True
        _assert_bitwise(got, want, f"{mode} call {call}")
    # 3 calls x (forward, backward) x 2 layers of one shape: two graphs, the rest replays
    assert be.graphs.captures == 2 and be.graphs.replays == 3 * 2 * 2 - 2
    assert all(("precision", mode) in k for k in be.graphs.keys())
    ops = [op for graph in fake.captured for op in graph]
    assert "gemm_ex" in ops and "gemm" not in ops             # every recurrent product in the mode
    assert ("f32_to_bf16" in ops) == (mode == "bf16")         # the per-step cast, inside the graph


def test_precision_selects_the_graph(graphed):
    be, _ = graphed
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    m = xlstm.LSTM(4, 5, seed=0, backend=be)
    outs = {}
    for mode in ("float32", "bf16", "tf32", "bf16"):
        m.precision = mode
        outs[mode] = np.array(m.forward(x)[0])
    assert be.graphs.captures == 3 and be.graphs.replays == 1
    assert not np.array_equal(outs["bf16"], outs["float32"])  # not the float32 graph replayed


def test_a_rounded_operand_left_out_is_caught(graphed, monkeypatch):
    """Drop the copy-in of U (here a Rounded bf16 operand): a second call with other weights
    must come out wrong, so the bitwise test above does check that U is a graph input."""
    from xlstm.backends import cuda_graphs

    be, _ = graphed
    spec = dict(cuda_graphs.SPECS["lstm_forward_sequence"])
    spec["read"] = {k: v for k, v in spec["read"].items() if k != "U"}
    monkeypatch.setitem(cuda_graphs.SPECS, "lstm_forward_sequence", spec)
    _run_mode(be, "bf16", False, 1, model_seed=1)
    got, _, _ = _run_mode(be, "bf16", False, 1, model_seed=2)
    be.cuda_graphs = False
    want, _, _ = _run_mode(be, "bf16", False, 1, model_seed=2)
    assert not np.array_equal(got["y"], want["y"])


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_persistent_kernels_are_not_picked_for_a_reduced_precision(graphed, mode):
    """The persistent kernels multiply in full float32: picked for float32 at this shape, never
    for tf32/bf16 ("auto" runs the per-step loop, "on" refuses and says why)."""
    from xlstm.backends.persistent import PersistentUnfit

    be, fake = graphed
    be.persistent = "auto"
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    m = xlstm.LSTM(4, 8, seed=0, backend=be)
    m.forward(x)
    assert be.last_path == "persistent"
    m.precision = mode
    fake.launches.clear()
    m.forward(x)
    assert be.last_path == "per-step" and not any("persistent" in k for k in fake.launches)
    be.persistent = "on"
    with pytest.raises(PersistentUnfit, match=f"precision '{mode}'"):
        m.forward(x)


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_without_nvmath_a_reduced_precision_refuses(host_lib, monkeypatch, mode):
    """No silent float32: without nvmath-python's cuBLAS, tf32/bf16 on CuPy is an error naming it."""
    from xlstm.backends import cupy_backend

    install_fakes(host_lib, monkeypatch, nvmath=False)
    monkeypatch.setattr(cupy_backend, "_graphs_note_shown", True)
    m = xlstm.LSTM(3, 4, seed=0, backend=cupy_backend.CupyBackend(), precision=mode)
    with pytest.raises(xlstm.BackendUnavailableError, match="nvmath-python"):
        m.forward(np.ones((3, 2, 3), np.float32))


def test_fake_nvmath_matches_the_real_binding():
    """The stand-in's gemm_ex takes the real nvmath 1.x binding's parameters in its order, and
    its enum values are the real ones (so what passes here is what the device gets)."""
    import inspect
    import re

    from support.standin import make_fake_cupy, make_fake_nvmath

    real = pytest.importorskip("nvmath.bindings.cublas")
    import nvmath

    fake = make_fake_nvmath(make_fake_cupy(None))
    cb = fake["nvmath.bindings.cublas"]
    sig = re.match(r"gemm_ex\((.*?)\)", real.gemm_ex.__doc__).group(1)
    assert [p.split()[-1] for p in sig.split(",")] == list(inspect.signature(cb.gemm_ex).parameters)
    for enum_name in ("ComputeType", "GemmAlgo"):
        for member in getattr(cb, enum_name):
            assert int(getattr(getattr(real, enum_name), member.name)) == int(member), member
    for member in fake["nvmath"].CudaDataType:
        assert int(getattr(nvmath.CudaDataType, member.name)) == int(member), member


# -- the bench's GEMM floor, timed the way the layer runs ----------------------------------------
@pytest.mark.parametrize("precision,tol", [("float32", 1e-6), ("tf32", 2e-3), ("bf16", 2e-2)])
def test_bench_floor_is_captured_like_the_layer(graphed, precision, tol):
    """With graphs on, the floor's per-step GEMMs are captured once per loop (through the same
    CublasGemm path the layer uses: cupy's own cuBLAS would refuse the capture) and replayed;
    every call does each loop exactly once, so the products equal a float64 NumPy computation."""
    from xlstm import bench

    be, fake = graphed
    T, B, D, H = 4, 2, 3, 5
    f = bench.GemmFloor(be.xp, T, B, D, H, 1, np.dtype("float32"), seed=0, backend=be, precision=precision)
    assert f.captured
    L = f.layers[0]
    x2, W, U, hs, dz = (np.array(L[k], np.float64) for k in ("x2", "W", "U", "hs", "dz"))
    want_gates = (x2 @ W).reshape(T, B, 4 * H) + hs[:T] @ U
    gemm = "gemm" if precision == "float32" else "gemm_ex"
    for call in range(3):                   # eager + capture, then two replays
        f.step()
        got = np.array(L["gates"], np.float64)
        assert np.max(np.abs(got - want_gates)) <= tol * np.max(np.abs(want_gates)), call
        # dh accumulates (beta = 1, as the layer's dh_next): after n calls, n times the sum
        want_dh = (call + 1) * dz.sum(axis=0) @ U.T
        assert np.max(np.abs(np.array(L["dh"]) - want_dh)) <= tol * np.max(np.abs(want_dh)) * 4, call
        assert len(fake.captured) == 2, "one graph per loop, captured on the first call only"
        assert [op for op in fake.captured[0] if op.startswith("gemm")] == [gemm] * T
        assert [op for op in fake.captured[1] if op.startswith("gemm")] == [gemm] * T
    assert len(fake.launched) == 4          # two replayed calls x (forward, backward)


def test_bench_floor_graph_keeps_the_bf16_scratch_it_baked_in(graphed):
    """The captured floor's cast kernels write the bf16 left operand into the backend's scratch,
    whose address the graph holds; the backend's cache may drop that scratch (``_tmp`` clears
    itself past 64 shapes). The floor's graph entry must keep it alive, so the replays still
    compute the products."""
    import gc
    import weakref

    from xlstm import bench

    be, fake = graphed
    T, B, D, H = 3, 2, 3, 5
    f = bench.GemmFloor(be.xp, T, B, D, H, 1, np.dtype("float32"), seed=0, backend=be, precision="bf16")
    f.step()                                   # eager run + capture
    assert f.captured
    refs = [weakref.ref(v) for k, v in be.scratch._bufs.items()
            if k[0] == be.mixed_gemm().SCRATCH_A and k[1] in ((B, H), (B, 4 * H))]
    assert len(refs) == 2                      # the per-step left operands: [B,H] forward, [B,4H] backward
    be.scratch.clear()
    gc.collect()
    assert all(r() is not None for r in refs), "the graph's scratch was freed under it"
    L = f.layers[0]
    x2, W, U, hs = (np.array(L[k], np.float64) for k in ("x2", "W", "U", "hs"))
    want = (x2 @ W).reshape(T, B, 4 * H) + hs[:T] @ U
    f.step()                                   # a replay
    assert np.max(np.abs(np.array(L["gates"], np.float64) - want)) <= 2e-2 * np.max(np.abs(want))


def test_bench_floor_stays_eager_when_its_capture_fails(graphed, monkeypatch):
    from support import standin
    from xlstm import bench

    be, fake = graphed

    real_end = standin._FakeStream.end_capture

    def refuse(self):
        real_end(self)
        raise RuntimeError("cudaErrorStreamCaptureUnsupported")
    monkeypatch.setattr(standin._FakeStream, "end_capture", refuse)
    f = bench.GemmFloor(be.xp, 3, 2, 3, 4, 1, np.dtype("float32"), seed=0, backend=be)
    f.step()
    f.step()
    assert not f.captured and "cudaErrorStreamCaptureUnsupported" in f.capture_failure
    assert fake.launched == []


def test_bench_floor_runs_eagerly_when_graphs_are_off(graphed):
    from xlstm import bench

    be, fake = graphed
    be.cuda_graphs = False
    f = bench.GemmFloor(be.xp, 3, 2, 3, 4, 2, np.dtype("float32"), seed=0, backend=be)
    f.step()
    f.step()
    assert not f.captured and fake.captured == [] and fake.launched == []


def _stand_in_bench(graphed, monkeypatch, tmp_path, *options, hidden="6", seq_len="3"):
    """``xlstm bench`` on the stand-in cupy (no memory pool to read): the saved JSON."""
    import json

    from xlstm import bench

    be, _ = graphed
    monkeypatch.setattr(be.xp, "get_default_memory_pool",
                        lambda: type("Pool", (), {"used_bytes": lambda self: 0})(), raising=False)
    monkeypatch.setattr(bench.cli, "_resolve_backends", lambda spec: [be])
    assert bench.main(["--hidden", hidden, "--seq-len", seq_len, "--batch", "2", "--layers", "1", "--repeat", "2",
                       "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot",
                       "--no-memory", *options, "--out", str(tmp_path), "--name", "b"]) == 0
    return json.loads((tmp_path / "b.json").read_text())


def test_bench_on_the_stand_in_cupy_reports_host_time_and_the_captured_floor(graphed, monkeypatch, tmp_path):
    """The whole cupy bench path on the host: checks against the float64 reference, first call
    with capture, captured floor, host time per time step per pass, rows on disk."""
    res = _stand_in_bench(graphed, monkeypatch, tmp_path, "--no-torch", seq_len="3,5")
    assert not res["meta"].get("partial")
    assert [(r["T"], r["status"]) for r in res["rows"]] == [(3, "ok"), (5, "ok")]
    for r in res["rows"]:
        assert r["floor_captured"] is True and r["cuda_graphs"] == "on"
        assert 0 < r["host_fwd_us"] < 1e6 and 0 < r["host_bwd_us"] < 1e6
        assert r["check_max_rel_err"] < 1e-5


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_bench_on_the_stand_in_cupy_in_each_precision(graphed, monkeypatch, tmp_path, precision):
    (r,) = _stand_in_bench(graphed, monkeypatch, tmp_path, "--no-torch", "--precision", precision)["rows"]
    assert r["status"] == "ok" and r["precision"] == precision and r["floor_captured"] is True


def test_bench_persistent_on_where_u_does_not_fit_is_an_error_row(graphed, monkeypatch, tmp_path):
    """--persistent on: on the stand-in's 2 SMs U fits on chip at H=6, not at
    H=256; that cell is an error row saying why, the other one is timed on the persistent path."""
    be, fake = graphed
    res = _stand_in_bench(graphed, monkeypatch, tmp_path, "--no-torch", "--persistent", "on", hidden="6,256")
    rows = {r["H"]: r for r in res["rows"]}
    assert rows[6]["status"] == "ok" and rows[256]["status"] == "error"
    assert "PersistentUnfit" in rows[256]["note"] and "shared memory" in rows[256]["note"]
    assert be.last_path == "persistent"
    assert {"lstm_persistent_forward_f32", "lstm_persistent_backward_f32"} <= set(fake.launches)


def test_bench_layer_norm_on_the_stand_in_cupy(graphed, monkeypatch, tmp_path):
    (r,) = _stand_in_bench(graphed, monkeypatch, tmp_path, "--layer-norm")["rows"]
    assert r["status"] == "ok" and r["layer_norm"] is True and r["check_max_rel_err"] < 1e-5
    assert any("ln_lstm_forward_step" in op for ops in graphed[1].captured for op in ops)
