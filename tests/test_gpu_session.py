"""The GPU session kit on the CPU: benchmarks/gpu_session.sh (its time budget and parts, run
here with the CPU-only parts) and its report generator benchmarks/gpu_readme.py (fed a real CPU
bench JSON, real pytest and train logs, and rows chosen on either side of each target)."""
import json
import os
import subprocess
import sys

import pytest

from support.bench import SecondNumpy as _SecondNumpy
from support.bench import load_script as _load_script
from xlstm import bench
from xlstm.backends.numpy_backend import NumpyBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("gpu_session.sh", "gpu_check.sh", "persistent_check.sh", "gpu_precision.sh")


@pytest.fixture(scope="module")
def gr():
    return _load_script("gpu_readme.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_scripts_parse(script):
    """They get one run on a scarce GPU: at least their shell syntax is checked here."""
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _session(out, seconds, *parts):
    env = dict(os.environ, PYTHON=sys.executable, XLSTM_SESSION_SECONDS=str(seconds),
               PYTHONPATH=ROOT, XLSTM_GPU_TEST_FILES="tests/test_imports.py")
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), str(out), *parts],
                          capture_output=True, text=True, env=env, timeout=300)


def test_session_skips_what_its_budget_cannot_hold_and_still_reports(tmp_path):
    """A 25 s session: machine runs, the bench (needs at least 60 s) is skipped as NOT MEASURED,
    the report is still written and its targets printed last."""
    r = _session(tmp_path, 25, "machine", "bench", "report")
    parts = [json.loads(s) for s in (tmp_path / "session.jsonl").read_text().splitlines()]
    assert [(p["part"], p["status"]) for p in parts] == [("machine", "done"), ("bench", "skipped"),
                                                         ("report", "done")], r.stdout + r.stderr
    assert "NOT MEASURED" in parts[1]["note"]
    readme = (tmp_path / "README.md").read_text()
    assert "| bench | skipped |" in readme and "nvmath-python:" in readme
    assert (tmp_path / "targets.txt").read_text() in r.stdout      # printed last: the reply's tail
    assert r.returncode == 0


def test_session_records_each_test_file(tmp_path):
    """The tests part: one pytest process per file, its counts and time in tests.jsonl."""
    _session(tmp_path, 120, "tests")
    recs = [json.loads(s) for s in (tmp_path / "tests.jsonl").read_text().splitlines()]
    assert [(t["group"], t["file"], t["rc"]) for t in recs] == [("main", "test_imports", 0)]
    # no gpu test in that file: pytest selects none (rc 5, counted as fine)
    assert recs[0]["passed"] == 0 and (tmp_path / "pytest-test_imports.txt").exists()
    _session(tmp_path, 120, "tests")                  # a rerun of the group replaces its lines
    assert len((tmp_path / "tests.jsonl").read_text().splitlines()) == 1
    assert len((tmp_path / "session.jsonl").read_text().splitlines()) == 2   # the parts' history
    _session(tmp_path, 120, "machine")                # a new session starts its records empty
    assert not (tmp_path / "tests.jsonl").exists()
    assert len((tmp_path / "session.jsonl").read_text().splitlines()) == 1


def test_pytest_counts_from_a_real_log(tmp_path, gr):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_a(): pass\n"
        "def test_b(): pass\n"
        "def test_c(): assert 0\n"
        "@pytest.mark.skip(reason='x')\n"
        "def test_d(): pass\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_x.py")],
                       stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    rec = gr.record_test_file(str(tmp_path / "t.jsonl"), "main", "test_x", 1, 3, 0, str(log))
    assert (rec["passed"], rec["failed"], rec["errors"], rec["skipped"]) == (2, 1, 0, 1)
    assert "2 passed" in rec["summary"]
    note = gr.record_test_file(str(tmp_path / "t.jsonl"), "main", "test_y", 1, 0, 0, "not run: no time")
    assert note["summary"] == "not run: no time" and note["passed"] == 0
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 2


def test_train_summary_from_a_real_run(tmp_path, gr):
    out = tmp_path / "s"
    out.mkdir()
    with open(out / "train-float32.txt", "w") as f:
        r = subprocess.run([sys.executable, "-m", "xlstm.app.cli", "train", "--backend", "numpy", "--steps", "12",
                            "--eval-every", "12", "--save-every", "1000000", "--log-every", "2", "--no-progress",
                            "--out", str(tmp_path / "run"), "--max-chars", "20000", "--hidden", "8"],
                           stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0
    os.replace(tmp_path / "run" / "metrics.jsonl", out / "train-float32-metrics.jsonl")
    res = gr.train_summary(str(out), "float32", 0, 12)
    recs = [json.loads(s) for s in (out / "train-float32-metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["split"] == "train" and x["step"] >= 4]
    assert res["steady_from_step"] == 4 == train[0]["step"]
    assert res["steps_per_s"] == pytest.approx((12 - 4) / (train[-1]["elapsed_s"] - train[0]["elapsed_s"]))
    assert res["final_val_loss"] == [x for x in recs if x["split"] == "val"][-1]["loss"]
    assert res["wall_s"] is not None and json.loads((out / "train-float32.json").read_text()) == res


def test_report_from_real_cpu_runs(tmp_path, monkeypatch, gr):
    """The tables come from real CPU runs laid out as the session lays them (a second NumPy
    labelled 'cupy'): gpu.json CuPy alone, numpy.json both backends in one run; the NumPy
    column and the speedup come from the latter, the CuPy column from the former; missing
    parts are said to be missing, and nothing is filled in."""
    grid = ["--hidden", "8", "--seq-len", "3,4", "--batch", "2", "--layers", "1", "--repeat", "2",
            "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-progress", "--no-plot",
            "--no-memory", "--no-torch", "--out", str(tmp_path)]
    monkeypatch.setattr(bench.cli, "_resolve_backends", lambda spec: [_SecondNumpy()])
    assert bench.main(grid + ["--name", "gpu"]) == 0
    monkeypatch.setattr(bench.cli, "_resolve_backends", lambda spec: [NumpyBackend(), _SecondNumpy()])
    assert bench.main(grid + ["--name", "numpy"]) == 0
    assert gr.main([str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    gpu_rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    two = json.loads((tmp_path / "numpy.json").read_text())["rows"]
    for T in (3, 4):
        n = next(r for r in two if r["backend"] == "numpy" and r["T"] == T)
        c2 = next(r for r in two if r["backend"] == "cupy" and r["T"] == T)
        c = next(r for r in gpu_rows if r["T"] == T)
        line = next(s for s in text.splitlines() if s.startswith(f"| 1 | 8 | {T} | 2 |"))
        assert gr._fmt(n["step_ms"]) in line and gr._fmt(c["step_ms"]) in line
        sp = n["step_ms"] / c2["step_ms"]               # the same run's ratio
        assert (f"{sp:.1f}x" in line) if sp >= 1 else ("CuPy slower" in line)
        # the CuPy detail table: the host time per step the bench measured for that row
        detail = next(s for s in text.splitlines() if s.startswith(f"| 8 | {T} | 2 | {gr._fmt(c['step_ms'])} |"))
        assert gr._fmt(c["host_fwd_us"], 1) in detail and "| no |" in detail    # floor not captured
    assert "session.jsonl missing" in text and "machine.txt missing" in text
    assert "graphs-off.json missing (not measured)" in text and "embedding_grad.json missing" in text
    assert "persistent-{off,on}.json missing (not measured)" in text
    tg = {t[1]: (t[2], t[3]) for t in gr.targets(str(tmp_path))}
    assert tg["`xlstm bench --backends numpy,cupy` passes its checks"] == (
        "2 CuPy cells checked against NumPy before timing", "MET")
    assert tg["CuPy step <= 0.6x cuDNN, H 256/1024, T 64/256, B=64"][1] == "NOT MEASURED"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "gpu.json missing (not measured)" in gr.build(str(empty))


def test_a_failed_check_is_not_met(tmp_path, gr):
    _write(tmp_path, "numpy.json", [_row(8, 3, 2, backend="numpy", step_ms=1.0)], partial=True,
           check_failed="cupy H=8 T=4 B=2: results disagree")
    v = {t[1]: (t[2], t[3]) for t in gr.targets(str(tmp_path))}
    assert v["`xlstm bench --backends numpy,cupy` passes its checks"] == (
        "check failed: cupy H=8 T=4 B=2: results disagree", "NOT MET")
    assert "numpy: the run did not finish" in gr.build(str(tmp_path))


def _row(H, T, B, backend="cupy", **kw):
    r = {c: None for c in bench.COLUMNS}
    r.update(backend=backend, H=H, T=T, B=B, layers=1, dtype="float32", precision="float32", status="ok", note="")
    r.update(kw)
    return r


def _write(folder, name, rows, **meta):
    (folder / name).write_text(json.dumps({"meta": meta, "rows": rows}))


def test_targets_on_either_side_of_each_bar(tmp_path, gr):
    """Rows chosen just inside and just outside the issues' bars give MET / NOT MET; a bar
    with cells missing (and none failing) is NOT MEASURED."""
    # issue 10, B=64: every H 256/1024 cell at 0.59x cuDNN (inside 0.6x) ...
    grid = [_row(H, T, 64, step_ms=1.0, step_over_torch=0.59, host_fwd_us=7.9, host_bwd_us=6.0,
                 cuda_graphs="on", graph_capture_s=0.1, fwd_ms=0.4) for H in (256, 1024) for T in (64, 256)]
    # ... H=2048 at 1.01x (outside 1.0x) on one T only, H=64 with one of two cells
    grid += [_row(2048, 64, 64, step_ms=10.0, step_over_torch=0.9, host_fwd_us=1, host_bwd_us=1, cuda_graphs="on"),
             _row(2048, 256, 64, step_ms=40.0, step_over_torch=1.01, host_fwd_us=1, host_bwd_us=9.5, cuda_graphs="on"),
             _row(64, 64, 64, step_ms=1.0, step_over_torch=1.5, host_fwd_us=1, host_bwd_us=1, cuda_graphs="on")]
    _write(tmp_path, "gpu.json", grid)
    _write(tmp_path, "b256.json", [_row(H, T, 256, step_ms=8.0, step_over_torch=0.8, step_over_floor=1.1,
                                        floor_captured=True) for H in (256, 1024, 2048) for T in (64, 256)])
    on = [_row(H, T, B, step_ms=1.0, step_over_torch=0.3 if H > 64 else 0.99, fwd_ms=0.19 * T / 64)
          for H in (64, 256, 512) for T in (64, 256) for B in (16, 64)]
    on[-1]["step_over_torch"] = 0.36
    _write(tmp_path, "persistent-on.json", on)
    _write(tmp_path, "persistent-off.json", [_row(64, 64, 16, step_ms=2.0)])
    # LayerNorm at 1.49x the plain step (1.0 ms) at 3 of its 4 cells, 1.6x at the fourth
    _write(tmp_path, "ln.json", [_row(H, T, 64, step_ms=1.6 if (H, T) == (1024, 256) else 1.49, layer_norm=True)
                                 for H in (256, 1024) for T in (64, 256)])
    _write(tmp_path, "precision-bf16.json", [_row(2048, T, B, step_ms=2.0, step_over_torch=0.95)
                                             for T in (64, 256) for B in (64, 256)])
    (tmp_path / "tests.jsonl").write_text(
        json.dumps(dict(group="main", file="test_train", rc=0, passed=3, failed=0, errors=0, skipped=0,
                        seconds=9, timed_out=False, summary="3 passed")) + "\n"
        + json.dumps(dict(group="main", file="test_precision", rc=1, passed=5, failed=1, errors=0, skipped=0,
                          seconds=4, timed_out=False, summary="1 failed, 5 passed")) + "\n")
    (tmp_path / "train-float32.json").write_text(json.dumps(dict(steps_per_s=340.0, final_val_loss=2.0)))
    (tmp_path / "train-bf16.json").write_text(json.dumps(dict(steps_per_s=400.0, final_val_loss=2.05, val_step=150)))
    v = {t[1]: t[3] for t in gr.targets(str(tmp_path))}
    assert v["CuPy step <= 0.6x cuDNN, H 256/1024, T 64/256, B=64"] == "MET"
    assert v["CuPy step <= 1.0x cuDNN at H=2048 (B=64)"] == "NOT MET"
    assert v["CuPy step <= 1.0x cuDNN at B=256, H >= 256"] == "MET"
    assert v["B=256: step <= 1.15x its own GEMM floor (floor captured like the step)"] == "MET"
    assert v["CuPy step <= 2x cuDNN at H=64 (B=64)"] == "NOT MEASURED"          # T=256 missing
    assert v["host time per time step per pass <= 8 us (graphs on; worst of fwd/bwd)"] == "NOT MET"  # 9.5 us
    assert v["LayerNorm cell <= 1.5x the plain cell's step (H 256/1024, T 64/256, B=64)"] == "NOT MET"
    assert v["`xlstm train --backend cupy` >= 4x 83 steps/s (150 steps in 1.8 s before)"] == "MET"  # 340 >= 333
    assert v["graph capture cost (first call vs steady) and graph memory reported"] == "MET"
    assert v["persistent step <= 1.0x cuDNN at H=64, T 64/256, B 16/64"] == "MET"
    assert v["persistent step <= 0.35x cuDNN at H 256/512, T 64/256, B 16/64"] == "NOT MET"   # one at 0.36
    assert v["persistent forward <= 3 us per time step at H=64, B=64"] == "MET"              # 2.97 us
    assert v["crossover measured (persistent on vs off per cell; table below)"] == "MET"
    assert v["tf32 step <= 1.0x cuDNN TF32, H >= 512, T 64/256, B 64/256"] == "NOT MEASURED"
    assert v["bf16 step <= 1.0x torch.autocast(bf16) cuDNN, H >= 512, T 64/256, B 64/256"] == "NOT MEASURED"
    # float32 10 / 40 ms (B=64) and 8 ms (B=256) over bf16 2 ms: 5x, 20x, 4x
    assert v["bf16 >= 4x this backend's float32 at H=2048 (float32: the bench part's rows)"] == "MET"
    assert v["`xlstm train --precision bf16` val loss within 2% of float32"] == "NOT MET"   # 2.5%
    assert v["GPU training bitwise repeatable; Ctrl-C + --resume equals the uninterrupted run"] == "MET"
    assert v["every gpu test passes (all files)"] == "NOT MET"
    text = gr.build(str(tmp_path))
    assert "| 1024 | 256 | 64 | 1.60 | 1.00 | **1.60x** |" in text and "| 256 | 64 | 64 | 1.49 | 1.00 | 1.49x |" in text
    assert "| 64 | 64 | 16 | 2.00 | 1.00 |" in text and "| on |" in text     # persistent: on beats off
