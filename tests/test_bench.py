"""Tests of the benchmark code itself (``xlstm bench``): tiny grids, no timing claims."""
import csv
import json

import numpy as np
import pytest

import xlstm
from support.bench import SecondNumpy, load_script
from xlstm import bench
from xlstm.backends.numpy_backend import NumpyBackend

TINY = ["--hidden", "8", "--seq-len", "3", "--batch", "2", "--layers", "1,2", "--repeat", "2",
        "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot"]


def _run(tmp_path, *extra, name="tiny"):
    return bench.main(TINY + ["--out", str(tmp_path), "--name", name, *extra])


def test_tiny_run_writes_json_and_csv_with_the_expected_columns(tmp_path, capsys):
    assert _run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "numpy backend (CPU)" in out and "step/fl" in out
    res = json.loads((tmp_path / "tiny.json").read_text())
    assert res["meta"]["machine"]["numpy"] == np.__version__
    assert res["meta"]["hidden"] == [8] and res["meta"]["layers"] == [1, 2]
    rows = res["rows"]
    assert [(r["backend"], r["layers"]) for r in rows] == [("numpy", 1), ("numpy", 2)]
    for r in rows:
        assert set(bench.COLUMNS) <= set(r)
        assert r["status"] == "ok" and r["H"] == 8 and r["T"] == 3 and r["B"] == 2
        assert r["step_ms"] > 0 and r["fwd_ms"] > 0 and r["floor_step_ms"] > 0
        assert r["step_over_floor"] == pytest.approx(r["step_ms"] / r["floor_step_ms"])
        assert r["step_tokens_per_s"] == pytest.approx(3 * 2 / (r["step_ms"] / 1e3))
        assert r["check_max_rel_err"] < bench.TOLERANCE["float32"]
    with open(tmp_path / "tiny.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.COLUMNS
        assert len(list(reader)) == 2


def test_torch_columns_when_torch_is_installed(tmp_path):
    torch = pytest.importorskip("torch")
    assert _run(tmp_path) == 0
    r = json.loads((tmp_path / "tiny.json").read_text())["rows"][0]
    assert r["torch_step_ms"] > 0 and r["step_over_torch"] == pytest.approx(r["step_ms"] / r["torch_step_ms"])
    assert json.loads((tmp_path / "tiny.json").read_text())["meta"]["machine"]["torch"] == torch.__version__


def test_without_torch_the_reference_cell_checks(tmp_path):
    assert _run(tmp_path, "--no-torch", "--dtype", "float64") == 0
    r = json.loads((tmp_path / "tiny.json").read_text())["rows"][0]
    assert r["torch_step_ms"] is None and r["check_max_rel_err"] < 1e-10


@pytest.mark.parametrize("no_torch", [False, True])
def test_a_wrong_result_is_caught_before_timing(tmp_path, monkeypatch, capsys, no_torch):
    if not no_torch:
        pytest.importorskip("torch")
    real = NumpyBackend.lstm_forward_sequence           # the loop the benchmark times

    def wrong(self, gates, hs, *args, **kw):
        real(self, gates, hs, *args, **kw)
        hs[1:] *= 1.01                  # a 1% error in every output

    monkeypatch.setattr(NumpyBackend, "lstm_forward_sequence", wrong)
    timed = []
    monkeypatch.setattr(bench.cells, "time_interleaved", lambda *a, **k: timed.append(1))
    assert _run(tmp_path, *(["--no-torch"] if no_torch else [])) == 1
    assert "results disagree" in capsys.readouterr().err
    assert not timed
    # every cell says why it was not timed; the run says it failed (exit 1, meta.check_failed)
    res = json.loads((tmp_path / "tiny.json").read_text())
    assert [r["status"] for r in res["rows"]] == ["failed", "failed"]
    assert all("results disagree" in r["note"] and r["step_ms"] is None for r in res["rows"])
    assert len(res["meta"]["check_failed"]) == 2 and not res["meta"].get("partial")


def test_one_failed_check_does_not_end_the_run(tmp_path, monkeypatch, capsys):
    """A cell whose results disagree (the bf16 check against cuDNN autocast is the likeliest)
    is a failed row; the cells after it are still checked and timed."""
    real = NumpyBackend.lstm_forward_sequence

    def wrong_at_T3(self, gates, hs, *args, **kw):
        real(self, gates, hs, *args, **kw)
        if gates.shape[0] == 3:
            hs[1:] *= 1.01

    monkeypatch.setattr(NumpyBackend, "lstm_forward_sequence", wrong_at_T3)
    assert bench.main(["--hidden", "8", "--seq-len", "3,5", "--batch", "2", "--layers", "1", "--repeat", "2",
                       "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot",
                       "--no-torch", "--no-memory", "--out", str(tmp_path), "--name", "f"]) == 1
    rows = {r["T"]: r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    assert rows[3]["status"] == "failed" and "results disagree" in rows[3]["note"]
    assert rows[5]["status"] == "ok" and rows[5]["step_ms"] > 0
    assert "1 cell(s) failed their check" in capsys.readouterr().err


def test_check_compares_gradients_too(monkeypatch):
    """A wrong weight gradient (outputs and dx right) is caught as well."""
    pytest.importorskip("torch")
    import torch

    real = xlstm.LSTM.backward

    def wrong_grads(self, dy, dstate=None):
        out = real(self, dy, dstate)
        self.grads["l0.U"] *= 1.05
        return out

    monkeypatch.setattr(xlstm.LSTM, "backward", wrong_grads)
    runner = bench.CellRunner(bench.Cell(8, 3, 2, 1), xlstm.backends.resolve("numpy"), "float32", torch)
    with pytest.raises(bench.BenchCheckError, match="weight_hh_l0"):
        runner.check()


def test_floor_does_the_layers_gemms():
    f = bench.GemmFloor(np, 3, 2, 5, 4, 2, np.dtype("float32"))
    f.step()
    assert [L["W"].shape for L in f.layers] == [(5, 16), (4, 16)]
    assert f.layers[0]["dW"].shape == (5, 16) and f.layers[0]["dx"].shape == (6, 5)
    assert bench.step_flops(3, 2, 5, 4, 1) == 2 * 3 * 2 * 16 * (5 + 4) * 3


def test_cells_over_the_cap_are_skipped_and_listed(tmp_path, capsys):
    # the first cell teaches the planner; bigger ones predicted over 0.001 s are skipped
    assert bench.main(["--hidden", "8,512", *TINY[2:], "--out", str(tmp_path), "--name", "cap",
                       "--max-cell-seconds", "0.001"]) == 0
    res = json.loads((tmp_path / "cap.json").read_text())
    skipped = [r for r in res["rows"] if r["status"] == "skipped"]
    assert skipped and all("max-cell-seconds" in r["note"] for r in skipped)
    assert len(res["meta"]["skipped"]) == len(skipped)
    assert "skipped" in capsys.readouterr().out


def test_load_merges_saved_results(tmp_path, capsys):
    assert _run(tmp_path) == 0
    capsys.readouterr()
    assert bench.main(["--load", str(tmp_path / "tiny.json"), "--out", str(tmp_path), "--name", "merged",
                       "--no-plot"]) == 0
    assert "numpy backend (CPU)" in capsys.readouterr().out
    assert (tmp_path / "merged.csv").exists()


def test_plot_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    res = {"meta": {}, "rows": []}
    assert bench.plot_results(res, str(tmp_path / "x.png")) == "no timed cells"
    assert bench.main(TINY[:-1] + ["--layers", "1", "--out", str(tmp_path), "--name", "p"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_cli_has_the_bench_subcommand():
    from xlstm.app.cli import SUBCOMMANDS, build_parser

    assert SUBCOMMANDS["bench"][0] == "xlstm.bench"
    args = build_parser().parse_args(["bench", "--quick", "--batch", "32,64"])
    assert args.quick and args.batch == (32, 64)
    assert args.persistent is None          # the backend's own choice unless forced
    assert build_parser().parse_args(["bench", "--persistent", "off"]).persistent == "off"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--persistent", "maybe"])


def test_bench_help_states_the_backends_persistent_default(monkeypatch):
    """--help names the default that applies without the flag: XLSTM_PERSISTENT, else the
    picker's own default (off until the crossover table is measured), not another one."""
    from xlstm.backends import persistent
    from xlstm.app.cli import build_parser

    monkeypatch.delenv(persistent.ENV, raising=False)
    default = persistent.mode_from_env()
    parser = build_parser()
    sub = next(a for a in parser._actions if getattr(a, "choices", None) and "bench" in a.choices)
    action = next(a for a in sub.choices["bench"]._actions if "--persistent" in a.option_strings)
    assert f"else {default}" in action.help


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_plain_pointwise_steps_allocate_nothing_per_step(dtype):
    """The performance plan: after the first step, the NumPy pointwise steps and the per-step
    GEMM reuse scratch buffers (tracemalloc sees NumPy's allocations) and keep the dtype.

    (A ufunc that broadcasts a [4H] row over [B,4H] allocates a [B,4H] buffer per call; this
    test caught that in the first version of the sigmoid-as-tanh constants.)"""
    import tracemalloc

    be = NumpyBackend()
    rng = np.random.default_rng(0)
    B, H = 32, 1024                 # a [B,H] array (128/256 KiB) is larger than NumPy's ufunc buffers
    z = rng.standard_normal((B, 4 * H)).astype(dtype)
    c_prev, h_prev = (rng.standard_normal((B, H)).astype(dtype) for _ in range(2))
    c, h, dc, dh = (np.empty((B, H), dtype) for _ in range(4))
    dz = np.empty((B, 4 * H), dtype)
    U = rng.standard_normal((H, 4 * H)).astype(dtype)
    UT = np.ascontiguousarray(U.T)

    def step():
        zz = z.copy()
        be.matmul_add(h_prev, U, zz)
        be.lstm_forward_step(zz, c_prev, h_prev, c, h, 1.0)
        dh[...] = 0.1
        dc[...] = 0.2
        be.lstm_backward_step(zz, c_prev, h, dh, dc, dz, dc, dh)
        be.matmul_add(dz, UT, dh)
        return zz

    step()                                             # first call makes the scratch
    zz = z.copy()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(3):
            be.matmul_add(h_prev, U, zz)
            be.lstm_forward_step(zz, c_prev, h_prev, c, h, 1.0)
            be.lstm_backward_step(zz, c_prev, h, dh, dc, dz, dc, dh)
            be.matmul_add(dz, UT, dh)
        after = tracemalloc.take_snapshot()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    # nothing kept, and no [B,H] or [B,4H] temporary: the only transient memory is the ufunc
    # iterator's buffers for the strided gate blocks (np.getbufsize() elements each, any B, H)
    itemsize = np.dtype(dtype).itemsize
    assert grown < 1024, grown
    assert peak <= 3 * np.getbufsize() * itemsize < B * H * itemsize, (peak, B * H * itemsize)
    for a in (zz, c, h, dz, dc, dh):
        assert a.dtype == np.dtype(dtype)


# -- host results are snapshots (on NumPy ``to_numpy`` is the live buffer) ------------------------
def _snapshot(host):
    y, dx, grads = host
    return np.array(y), np.array(dx), {k: np.array(v) for k, v in grads.items()}


@pytest.mark.parametrize("use_torch", [False, True])
def test_host_results_do_not_change_when_the_backend_runs_again(use_torch):
    """What ``check`` keeps of one backend is what that backend computed then, not a view of
    gradients that the timing runs go on accumulating into."""
    torch = pytest.importorskip("torch") if use_torch else None
    runner = bench.CellRunner(bench.Cell(8, 3, 2, 1), xlstm.backends.resolve("numpy"), "float32",
                              torch, use_torch=use_torch)
    runner.check()
    before = _snapshot(runner.host_results)
    for c in runner.contenders():       # what the timing does after the check
        c.fn()
    runner.memory()
    after = runner.host_results
    for a, b in ((after[0], before[0]), (after[1], before[1])):
        np.testing.assert_array_equal(a, b)
    for k in before[2]:
        np.testing.assert_array_equal(after[2][k], before[2][k], err_msg=f"grad {k} changed")
    # and the snapshot owns its memory: no view of the model's arrays
    for k, g in runner.lstm.grads.items():
        assert not np.shares_memory(after[2][k], g), k


def test_two_backends_agree_in_one_run(tmp_path, monkeypatch, capsys):
    """The second backend of a cell is checked against what the first computed in its check; had
    the first backend's host results been live buffers, its gradients would have grown by every
    timed step by then and every cell would fail ('dl0.U vs numpy backend: 0.8')."""
    monkeypatch.setattr(bench.cli, "_resolve_backends", lambda spec: [NumpyBackend(), SecondNumpy()])
    rc = bench.main(["--hidden", "8", "--seq-len", "3", "--batch", "2", "--layers", "1", "--repeat", "3",
                     "--min-repeat", "3", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot",
                     "--no-memory", "--out", str(tmp_path), "--name", "two"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "two.json").read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [("numpy", "ok"), ("cupy", "ok")]
    assert rows[1]["check_max_rel_err"] < bench.TOLERANCE["float32"]
    assert rows[1]["speedup_vs_numpy"] > 0


def test_embedding_grad_microbenchmark_checks_and_writes(tmp_path, capsys):
    """benchmarks/embedding_grad.py (sort vs one-hot on the GPU) runs here on a tiny grid."""
    mod = load_script("embedding_grad.py")
    assert mod.main(["--backend", "numpy", "--repeat", "2", "--vocab", "5,300", "--tokens", "64",
                     "--dims", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "embedding_grad.json").read_text())["rows"]
    assert {(r["V"], r["method"]) for r in rows} == {(v, m) for v in (5, 300) for m in mod.METHODS}
    for r in rows:
        assert r["median_ms"] > 0 and r["max_abs_err_f64"] < 1e-12 and r["bitwise_repeatable"]
    assert (tmp_path / "embedding_grad.csv").exists()


def test_a_cell_the_backend_refuses_is_an_error_row_and_the_grid_goes_on(tmp_path, monkeypatch, capsys):
    """E.g. ``--persistent on`` where U does not fit on chip: that cell says why, the rest run."""
    from xlstm.errors import InputError

    real = NumpyBackend.lstm_forward_sequence

    def refuse_T5(self, gates, *a, **k):
        if gates.shape[0] == 5:
            raise InputError("this shape does not fit (test)")
        return real(self, gates, *a, **k)

    monkeypatch.setattr(NumpyBackend, "lstm_forward_sequence", refuse_T5)
    assert bench.main(["--hidden", "8", "--seq-len", "3,5", "--batch", "2", "--layers", "1", "--repeat", "2",
                       "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot",
                       "--no-torch", "--out", str(tmp_path), "--name", "e"]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert {r["T"]: r["status"] for r in rows} == {3: "ok", 5: "error"}
    bad = next(r for r in rows if r["T"] == 5)
    assert "does not fit (test)" in bad["note"] and bad["step_ms"] is None
    assert "error: InputError: this shape does not fit" in capsys.readouterr().out


def test_layer_norm_cells_are_checked_against_the_numpy_backend_in_float64(tmp_path, capsys, monkeypatch):
    """--layer-norm: torch has no such cell, so it is not timed; a wrong LayerNorm result is
    caught by the float64 NumPy-backend reference before timing."""
    assert bench.main(["--hidden", "8", "--seq-len", "3", "--batch", "2", "--layers", "1,2", "--repeat", "2",
                       "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot",
                       "--layer-norm", "--out", str(tmp_path), "--name", "ln"]) == 0
    res = json.loads((tmp_path / "ln.json").read_text())
    assert res["meta"]["layer_norm"] is True
    for r in res["rows"]:
        assert r["status"] == "ok" and r["layer_norm"] is True and r["torch_step_ms"] is None
        assert r["check_max_rel_err"] < 1e-5
    assert "LayerNorm cell" in capsys.readouterr().out

    class WrongLN(NumpyBackend):        # the backend under test errs; the reference does not
        name = "cupy"

        def ln_lstm_forward_step(self, *a, **k):
            super().ln_lstm_forward_step(*a, **k)
            h = a[8]
            h *= 1.01                   # h, in place: a 1% error in every output

    monkeypatch.setattr(bench.cli, "_resolve_backends", lambda spec: [WrongLN()])
    assert bench.main(["--hidden", "8", "--seq-len", "3", "--batch", "2", "--layers", "1", "--repeat", "2",
                       "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot",
                       "--layer-norm", "--out", str(tmp_path), "--name", "ln2"]) == 1
    assert "results disagree" in capsys.readouterr().err


# -- where a run writes, and its figure -------------------------------------------------------------
def test_bench_writes_into_a_new_run_folder_not_beside_committed_results(tmp_path):
    """A clone must not turn dirty: without --out the files go to runs/bench-NNN under the
    current directory (a fresh one per run), never to benchmarks/results/."""
    from support.cli import xlstm as run_xlstm

    opts = ["bench", "--hidden", "8", "--seq-len", "3", "--batch", "2", "--layers", "1", "--repeat", "1",
            "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot", "--no-memory",
            "--no-torch"]
    for n in (1, 2):
        r = run_xlstm(*opts, check=0, cwd=tmp_path)
        run = tmp_path / "runs" / f"bench-{n:03d}"
        assert (run / "bench-numpy.json").exists() and (run / "bench-numpy.csv").exists(), r.stdout
        assert str(run.relative_to(tmp_path)) in r.stdout
    assert not (tmp_path / "benchmarks").exists()


def _plot_rows(layers=(1,), Hs=(64, 256, 1024)):
    from xlstm.bench.report import COLUMNS

    rows = []
    for L in layers:
        for H in Hs:
            for T in (16, 64):
                r = dict.fromkeys(COLUMNS)
                r.update(backend="numpy", H=H, T=T, B=32, layers=L, dtype="float32", status="ok",
                         step_ms=H * T * L / 100, floor_step_ms=H * T * L / 150, torch_step_ms=H * T * L / 120,
                         step_over_floor=1.5, step_over_torch=1.2)
                rows.append(r)
    return {"meta": {}, "rows": rows}


def test_plot_labels_the_h_axis_with_the_measured_sizes_only():
    """Log-scaled H axes carry plain integer labels at the measured sizes: matplotlib's own
    minor labels (6x10^1 beside 64) overlapped them."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from xlstm.bench.report import figure

    fig = figure(_plot_rows())
    fig.canvas.draw()
    try:
        for ax in fig.axes:
            major = [t.get_text() for t in ax.get_xticklabels()]
            minor = [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
            assert major == ["64", "256", "1024"] and minor == [], (ax.get_title(), major, minor)
    finally:
        plt.close(fig)


def test_plot_draws_a_panel_for_every_layer_count():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from xlstm.bench.report import figure

    fig = figure(_plot_rows(layers=(1, 2)))
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert sum("2 layers" in t for t in titles) == 4 and sum("1 layer" in t for t in titles) == 4, titles
        two = next(ax for ax in fig.axes if ax.get_title().startswith("T=64, 2 layers"))
        xlstm_line = next(ln for ln in two.get_lines() if ln.get_label() == "xlstm numpy")
        assert list(xlstm_line.get_ydata()) == [H * 64 * 2 / 100 for H in (64, 256, 1024)]
    finally:
        plt.close(fig)
