"""Traces: the named per-step values agree with the fast path and with the reference cell."""
import numpy as np
import pytest

from xlstm import LSTM
from xlstm.backends import get_backend
from xlstm.trace import BACKWARD_NAMES, Trace, record

PLAIN_FWD = ("x", "z", "i", "f", "g", "o", "c", "h")
PLAIN_BWD = ("dHt", "dOt", "dCt", "dCprojt", "dFt", "dIt", "dz", "dHX", "dh_next", "dc_next")
LN_EXTRA = ("zn", "c_new", "cn", "dCnorm", "dzn")

CONFIGS = {
    "plain": dict(kw={}, lengths=None),
    "layer_norm": dict(kw=dict(layer_norm=True), lengths=None),
    "bidir_2layers_lengths": dict(kw=dict(num_layers=2, bidirectional=True), lengths=[4, 2, 3]),
    "ln_bidir_lengths": dict(kw=dict(layer_norm=True, bidirectional=True), lengths=[4, 1, 3]),
    "dropout_zoneout": dict(kw=dict(recurrent_dropout=0.3, zoneout=0.2), lengths=[4, 3, 2]),
    "ln_dropout_zoneout": dict(kw=dict(layer_norm=True, recurrent_dropout=0.3, zoneout=0.2), lengths=None),
}


def _run(case, seed=0):
    c = CONFIGS[case]
    lstm = LSTM(3, 4, dtype="float64", seed=seed, backend="numpy", **c["kw"])
    rng = np.random.default_rng(seed)
    S = lstm.num_layers * lstm.num_directions
    x = rng.standard_normal((4, 3, 3))
    state = (rng.standard_normal((S, 3, 4)), rng.standard_normal((S, 3, 4)))
    y, (hn, cn) = lstm.forward(x, state, lengths=c["lengths"], trace=True)
    dy = rng.standard_normal(y.shape)
    dstate = (rng.standard_normal(hn.shape), rng.standard_normal(cn.shape))
    lstm.zero_grad()
    dx, (dh0, dc0) = lstm.backward(dy, dstate, trace=True)
    return lstm, lstm.last_trace, dict(x=x, y=y, hn=hn, cn=cn, dx=dx, dh0=dh0, dc0=dc0)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_fast_path_equals_reference_cell(case):
    lstm, tr, _ = _run(case)
    dirs = ("fw", "bw")[:lstm.num_directions]
    parts = {f"l{k}/{d}/{w}" for k in range(lstm.num_layers) for d in dirs for w in ("forward", "backward")}
    assert set(tr.mismatch) == parts
    assert tr.max_mismatch < 1e-12, tr.mismatch
    tr.check(1e-12)
    names = PLAIN_FWD + PLAIN_BWD + (LN_EXTRA if lstm.layer_norm else ())
    for k in range(lstm.num_layers):
        for d in dirs:
            for t in range(4):
                for n in names:
                    assert f"l{k}/{d}/t{t}/{n}" in tr, (k, d, t, n)
    if not lstm.layer_norm:
        assert "l0/fw/t0/dzn" not in tr


def test_trace_values_are_the_layer_values():
    """Forward h/c per step are the layer's outputs; the recorded dz rebuild the weight
    gradients; dh_next/dc_next at t=0 are dh0/dc0; dHX[:, :D] summed is dx."""
    lstm, tr, r = _run("plain")
    T = 4
    for t in range(T):
        np.testing.assert_allclose(tr[f"l0/fw/t{t}/h"], r["y"][t], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(tr["l0/fw/t3/c"], r["cn"][0], rtol=1e-12, atol=1e-14)
    dz = np.stack([tr[f"l0/fw/t{t}/dz"] for t in range(T)])
    xs = np.stack([tr[f"l0/fw/t{t}/x"] for t in range(T)])
    hs_prev = np.concatenate([lstm._cache["caches"][0]["hs"][:1], np.stack([tr[f"l0/fw/t{t}/h"] for t in range(T - 1)])])
    np.testing.assert_allclose(np.einsum("tbd,tbg->dg", xs, dz), lstm.grads["l0.W"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.einsum("tbh,tbg->hg", hs_prev, dz), lstm.grads["l0.U"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dz.sum(axis=(0, 1)), lstm.grads["l0.b"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tr["l0/fw/t0/dh_next"], r["dh0"][0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tr["l0/fw/t0/dc_next"], r["dc0"][0], rtol=1e-12, atol=1e-12)
    dx = np.stack([tr[f"l0/fw/t{t}/dHX"][:, :3] for t in range(T)])
    np.testing.assert_allclose(dx, r["dx"], rtol=1e-12, atol=1e-12)
    # the seed's chain inside one step: dOt, dCt, ... follow from dHt
    o, i, g, f = (tr[f"l0/fw/t2/{n}"] for n in "oigf")
    c_prev = tr["l0/fw/t1/c"]
    np.testing.assert_allclose(tr["l0/fw/t2/dCprojt"], tr["l0/fw/t2/dCt"] * i)
    np.testing.assert_allclose(tr["l0/fw/t2/dFt"], tr["l0/fw/t2/dCt"] * c_prev)
    np.testing.assert_allclose(tr["l0/fw/t2/dIt"], tr["l0/fw/t2/dCt"] * g)
    np.testing.assert_allclose(tr["l0/fw/t2/dOt"], tr["l0/fw/t2/dHt"] * np.tanh(tr["l0/fw/t2/c"]))


def test_bw_steps_run_backwards_within_each_length():
    """bw step t of sequence b reads position L_b-1-t and its h is the output there."""
    _, tr, r = _run("bidir_2layers_lengths")
    for b, L in enumerate([4, 2, 3]):
        for t in range(L):
            np.testing.assert_array_equal(tr[f"l0/bw/t{t}/x"][b], r["x"][L - 1 - t, b])
            np.testing.assert_allclose(tr[f"l1/bw/t{t}/h"][b], r["y"][L - 1 - t, b, 4:], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(tr[f"l1/bw/t{L - 1}/h"][b], r["hn"][3, b], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(tr[f"l1/fw/t{L - 1}/h"][b], r["hn"][2, b], rtol=1e-12, atol=1e-14)


def test_check_catches_a_broken_fast_path(monkeypatch):
    """Perturb the fused forward step: the trace's reference comparison must notice."""
    be = get_backend()
    orig = type(be).lstm_forward_step

    def broken(self, z, c_prev, h_prev, c, h, *a, **k):
        orig(self, z, c_prev, h_prev, c, h, *a, **k)
        h *= 1.001

    monkeypatch.setattr(type(be), "lstm_forward_step", broken)
    _, tr, _ = _run("plain")
    assert tr.mismatch["l0/fw/forward"] > 1e-4
    with pytest.raises(AssertionError, match="differs"):
        tr.check(1e-6)


def test_check_catches_a_broken_ln_backward(monkeypatch):
    be = get_backend()
    orig = type(be).ln_lstm_backward_step

    def broken(self, *a, **k):
        orig(self, *a, **k)
        a[12][...] *= 1.001                                      # dz

    monkeypatch.setattr(type(be), "ln_lstm_backward_step", broken)
    _, tr, _ = _run("layer_norm")
    assert tr.mismatch["l0/fw/backward"] > 1e-4
    assert tr.mismatch["l0/fw/forward"] < 1e-12


def test_off_by_default_and_record_context():
    lstm = LSTM(3, 2, dtype="float64", seed=0, backend="numpy")
    x = np.ones((2, 1, 3))
    lstm.forward(x)
    assert lstm.tracer is None and getattr(lstm, "last_trace", None) is None
    with record(lstm) as tr:
        assert lstm.tracer is tr
        y, _ = lstm.forward(x)
        lstm.backward(np.ones_like(y))
    assert lstm.tracer is None and lstm.last_trace is tr
    assert {"l0/fw/t1/h", "l0/fw/t1/dCt"} <= set(tr.keys())
    y, _ = lstm.forward(x, trace=True)
    assert lstm.tracer is None and lstm.last_trace is not tr
    assert "l0/fw/t0/dCt" not in lstm.last_trace          # a new forward starts a new trace


def test_save_load_roundtrip(tmp_path):
    _, tr, _ = _run("ln_bidir_lengths")
    path = tmp_path / "trace.npz"
    tr.save(path)
    with np.load(path) as f:
        assert "l0/bw/t3/dCt" in f.files and "l0/fw/t0/zn" in f.files
    back = Trace.load(path)
    assert back.keys() == tr.keys()
    assert back.title == tr.title and back.mismatch == tr.mismatch
    for k in tr.keys():
        np.testing.assert_array_equal(back[k], tr[k])
    with pytest.raises(KeyError, match="l0/fw/t0/dCt"):
        back["l9/fw/t0/h"]


def test_print_is_a_readable_table():
    _, tr, _ = _run("plain")
    s = str(tr)
    assert "== layer 0, direction fw ==" in s
    lines = s.splitlines()
    t0 = lines.index("t=0")
    row = next(l for l in lines[t0:] if l.strip().startswith("dCt"))
    assert "[  3x4]" in row and row.count("[") == 1 + 1 + 3    # shape, then the [3,4] array on one line
    for n in BACKWARD_NAMES[:2] + ("dh_next", "h", "z"):
        assert any(l.strip().startswith(n + " ") for l in lines), n


def test_cli_trace_prints_the_tensorflow_cell(capsys, tmp_path):
    """`xlstm trace` runs TF's section-1 cell: its t=0 h and c are TensorFlow's printed values."""
    from xlstm.app.cli import main

    path = tmp_path / "t.npz"
    assert main(["trace", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    t0 = out[out.index("t=0"):out.index("t=1")]
    assert "[0.6412 0.6817]" in t0 and "[0.8848 0.981 ]" in t0
    tr = Trace.load(path)
    np.testing.assert_allclose(tr["l0/fw/t0/h"][0], [0.64121795, 0.68166804], rtol=1e-6)
    np.testing.assert_allclose(tr["l0/fw/t0/c"][0], [0.88477188, 0.98103917], rtol=1e-6)
    assert main(["trace", "--layer-norm", "--bidirectional", "--seq-len", "2"]) == 0
    assert "direction bw" in capsys.readouterr().out
