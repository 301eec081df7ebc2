"""The GPU session on the CPU: its plan held to its budget, a dry run of the whole session against
the stand-in cupy, degradation after a failed smoke check, caps, and the report's targets from
rows chosen on either side of each bar."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import gpu_plan, gpu_report, gpu_session
from xlstm.bench import COLUMNS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- the plan -----------------------------------------------------------------------------------
def test_the_plan_fits_its_budget():
    """Caps and estimates each add up to at most the one budget (<= 400 s on an H200), every
    estimate is within its cap, and the budget leaves the device call's hard limit room."""
    caps = sum(s.cap_s for _, s in gpu_plan.steps())
    estimates = sum(s.estimate_s for _, s in gpu_plan.steps())
    assert gpu_plan.TOTAL_SECONDS <= 400 and caps <= gpu_plan.TOTAL_SECONDS, caps
    assert estimates <= caps
    assert all(s.estimate_s <= s.cap_s for _, s in gpu_plan.steps())
    assert sum(p.cap_s for p in gpu_plan.PARTS) == caps
    assert gpu_plan.TOTAL_SECONDS + 30 <= gpu_plan.HARD_LIMIT_SECONDS <= 450
    assert gpu_plan.PARTS[0].cap_s <= 15                     # the smoke part


def test_the_parts_are_ordered_by_value():
    assert [p.name for p in gpu_plan.PARTS] == ["smoke", "tests", "record", "precision", "crossover", "train",
                                                "torch-module", "report"]
    tests = next(p for p in gpu_plan.PARTS if p.name == "tests").steps
    assert [s.args[0] for s in tests[:4]] == ["tests/test_cupy_backend.py", "tests/test_cuda_graphs.py",
                                              "tests/test_train_step_syncs.py", "tests/test_train.py"]
    assert tests[-1].args == ("tests/test_distributed.py",) and tests[-1].cap_s <= 10   # NCCL last, short
    assert tests[-2].name == "tests-persistent"             # a trap ends its own process only
    record = next(p for p in gpu_plan.PARTS if p.name == "record").steps[0]
    a = list(record.args)
    assert a[a.index("--hidden") + 1] == "64,256,1024,2048" and a[a.index("--seq-len") + 1] == "64,256"
    assert a[a.index("--batch") + 1] == "64" and "--cuda-graphs" not in a   # graphs: the smoke part decides


def test_every_file_with_gpu_tests_is_in_the_plan():
    planned = {s.args[0] for _, s in gpu_plan.steps() if s.kind == "pytest"}
    with_gpu = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "tests"))
                for f in files if f.startswith("test_") and f.endswith(".py")
                and "pytest.mark.gpu" in open(os.path.join(d, f)).read()}
    assert with_gpu - {"tests/test_gpu_session.py"} <= planned, with_gpu - planned


def test_every_target_of_the_compass_is_stated():
    keys = [t.key for t in gpu_plan.TARGETS]
    assert keys == ["step-h64", "step-h256-512", "step-h1024", "step-h2048", "floor-h2048", "host-us", "bf16",
                    "train-bitwise", "resume"]
    limits = {t.key: t.limit for t in gpu_plan.TARGETS}
    assert limits["step-h64"] == 1.0 and limits["step-h256-512"] == 0.35 and limits["step-h1024"] == 0.6
    assert limits["step-h2048"] == 1.0 and limits["floor-h2048"] == 1.15 and limits["host-us"] == 8.0
    # every bench target's cells are in the grid of a step that measures them
    for t in gpu_plan.TARGETS:
        grid = set()
        for src in t.sources:
            a = list(next(s for _, s in gpu_plan.steps() if s.name == src).args)
            grid |= set(gpu_plan.grid(*(tuple(int(v) for v in a[a.index(o) + 1].split(","))
                                        for o in ("--hidden", "--seq-len", "--batch"))))
        assert set(t.cells) <= grid, (t.key, set(t.cells) - grid)


# -- the dry run on the stand-in cupy ---------------------------------------------------------------
def _dry(host_lib, out, *options, **env):
    py = f"{sys.executable} {os.path.join(ROOT, 'tests', 'support', 'standin_exec.py')}"
    e = dict(os.environ, PYTHONPATH=ROOT, STANDIN_LIB=host_lib._name, **env)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_session", str(out), "--dry-run", "--python", py,
                           *options], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


def _records(out):
    return {r["step"]: r for r in map(json.loads, (out / "session.jsonl").read_text().splitlines())
            if "step" in r}


@pytest.mark.slow
def test_a_dry_run_of_the_whole_session_writes_every_parts_files(host_lib, tmp_path):
    out = tmp_path / "s"
    r = _dry(host_lib, out)
    recs = _records(out)
    steps = [s for _, s in gpu_plan.steps() if s.kind != "report"]
    assert list(recs) == [s.name for s in steps], r.stdout + r.stderr
    for s in steps:
        assert (out / f"{s.name}.txt").exists(), s.name
        assert recs[s.name]["status"] == "done", (s.name, recs[s.name])
        if s.kind == "bench":
            res = json.loads((out / f"{s.name}.json").read_text())
            backend = "numpy" if s.name == "torch-module" else "cupy"      # the stand-in has no torch CUDA
            assert res["rows"] and all(x["status"] == "ok" and x["backend"] == backend for x in res["rows"]), s.name
        if s.kind == "pytest":
            assert (out / f"{s.name}.xml").exists()
        if s.kind == "train":
            assert json.loads((out / f"{s.name}.json").read_text())["final_val_loss"] is not None
    smoke = json.loads((out / "smoke.json").read_text())
    assert {k: smoke[k] for k in ("cupy", "nvmath", "graphs", "persistent")} == dict.fromkeys(
        ("cupy", "nvmath", "graphs", "persistent"), "ok")
    readme = (out / "README.md").read_text()
    assert "Dry run on the CPU" in readme
    targets = (out / "targets.txt").read_text().splitlines()
    assert len(targets) == len(gpu_plan.TARGETS) and all(t.startswith("[NOT MEASURED]") for t in targets)
    assert r.stdout.endswith((out / "targets.txt").read_text())          # the reply's tail
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_failed_smoke_checks_set_the_later_parts_environment(host_lib, tmp_path):
    """A device that refuses capture and a CuPy too old for the persistent kernels: the smoke
    part says so, the bench then runs with graphs off and the persistent kernels off, and the
    step that needs them is skipped as NOT MEASURED with the reason, instead of failing."""
    out = tmp_path / "s"
    _dry(host_lib, out, "--parts", "smoke,crossover,report", STANDIN_CAPTURE_FAILS="1",
         STANDIN_CUPY_VERSION="14.1.0")
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["graphs"].startswith("capture failed") and "cudaErrorStreamCaptureUnsupported" in smoke["graphs"]
    assert "CuPy >= 14.2" in smoke["persistent"] and "14.1.0" in smoke["persistent"]
    recs = _records(out)
    off = recs["crossover-off"]
    assert off["status"] == "done" and off["env"] == {"XLSTM_CUDA_GRAPHS": "0", "XLSTM_PERSISTENT": "off"}
    rows = json.loads((out / "crossover-off.json").read_text())["rows"]
    assert rows and all(x["cuda_graphs"] == "off" for x in rows)
    on = recs["crossover-on"]
    assert on["status"] == "skipped" and "NOT MEASURED" in on["note"] and "14.1.0" in on["note"]
    assert not (out / "crossover-on.txt").exists()
    assert "| crossover | crossover-on | skipped |" in (out / "README.md").read_text()


def test_a_step_past_its_cap_is_killed_with_what_it_started(tmp_path):
    import time

    log = tmp_path / "log.txt"
    code = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print('child', c.pid, flush=True); time.sleep(60)"
    t0 = time.monotonic()
    rc, timed_out = gpu_session.run_process([sys.executable, "-c", code], dict(os.environ), 2, str(log))
    assert timed_out and rc != 0 and time.monotonic() - t0 < 20
    child = int(next(s for s in log.read_text().splitlines() if s.startswith("child")).split()[1])
    for _ in range(50):                 # the grandchild too (reaped by init once killed)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail(f"process {child}, started by the step, outlived its cap")


def test_steps_that_the_budget_cannot_hold_are_skipped_and_the_report_still_written(tmp_path, capsys):
    assert gpu_session.run_session(str(tmp_path), ["train", "report"], total=8) == 0
    recs = _records(tmp_path)
    assert {r["status"] for r in recs.values()} == {"skipped"}
    assert all("s left of the session's 8 s" in r["note"] for r in recs.values())
    assert (tmp_path / "README.md").exists() and (tmp_path / "targets.txt").read_text() in capsys.readouterr().out


def test_a_gpu_test_file_with_no_gpu_test_left_fails_its_step(tmp_path, monkeypatch):
    """pytest's exit 5 (nothing collected) is not a pass: a file whose gpu tests were renamed away
    would otherwise read as done in the report."""
    step = gpu_plan.Step("tests-none", "pytest", 60, 5, args=("tests/test_data.py",), needs=())
    monkeypatch.setattr(gpu_plan, "PARTS", (gpu_plan.Part("tests", "gpu tests", (step,)),))
    monkeypatch.chdir(ROOT)
    assert gpu_session.run_session(str(tmp_path), ["tests"]) == 1
    rec = _records(tmp_path)["tests-none"]
    assert rec["status"] == "failed" and rec["rc"] == 5 and "no gpu test collected" in rec["note"]


# -- the report's targets ---------------------------------------------------------------------------
def _row(H, T, B=64, **kw):
    r = dict.fromkeys(COLUMNS)
    r.update(backend="cupy", H=H, T=T, B=B, layers=1, dtype="float32", precision="float32", status="ok", note="",
             step_ms=1.0, step_tokens_per_s=T * B / 1e-3)
    r.update(kw)
    return r


def _write(folder, name, rows):
    (folder / f"{name}.json").write_text(json.dumps({"meta": {}, "rows": rows}))


def _junit(folder, tmp_path, step, body):
    """A real JUnit XML: pytest run on a test_train.py with these test functions."""
    d = tmp_path / f"src-{step}"
    d.mkdir()
    (d / "test_train.py").write_text(textwrap.dedent(body))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={folder / step}.xml",
                    str(d / "test_train.py")], capture_output=True, cwd=d)
    rec = gpu_report.record_tests(gpu_plan.Step(step, "pytest", 1, 1, args=("tests/test_train.py",)), str(folder),
                                  1, 1.0, False)
    with open(folder / "tests.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def test_targets_on_either_side_of_each_bar(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    # H=64: the per-step loop at 1.2x, the persistent kernels at 0.9x: the best path counts (MET)
    record = [_row(64, T, step_over_torch=1.2, host_fwd_us=7.9, host_bwd_us=6.0) for T in (64, 256)]
    # H=256 at 0.34x, H=512 (crossover only) at 0.36x at one T: NOT MET
    record += [_row(256, T, step_over_torch=0.34, host_fwd_us=5, host_bwd_us=5) for T in (64, 256)]
    # H=1024 at 0.6x on one T only: NOT MEASURED (a cell missing, none failing)
    record += [_row(1024, 64, step_over_torch=0.6, host_fwd_us=5, host_bwd_us=9.5)]
    # H=2048 at 0.99x; floor 1.14x captured at T=64, 1.2x NOT captured at T=256 (does not count)
    record += [_row(2048, 64, step_over_torch=0.99, step_over_floor=1.14, floor_captured=True, host_fwd_us=1,
                    host_bwd_us=1),
               _row(2048, 256, step_over_torch=0.99, step_over_floor=1.2, floor_captured=False, host_fwd_us=1,
                    host_bwd_us=1)]
    _write(out, "record", record)
    _write(out, "crossover-on", [_row(64, T, step_over_torch=0.9) for T in (64, 256)])
    _write(out, "crossover-off", [_row(512, 64, step_over_torch=0.3), _row(512, 256, step_over_torch=0.36)])
    _write(out, "precision-bf16", [_row(H, T, step_over_torch=1.0) for H in (512, 1024, 2048) for T in (64, 256)])
    _junit(out, tmp_path, "tests-train", """
        import pytest
        @pytest.mark.parametrize("extra", ["a", "b"])
        def test_gpu_two_runs_with_one_seed_are_bitwise_equal(extra): pass
        def test_gpu_interrupt_and_resume_equals_uninterrupted_bit_for_bit(): pass
        def test_gpu_ctrl_c_then_resume_equals_uninterrupted(): assert 0
    """)
    got = {t.key: (m, v) for t, m, v in gpu_report.targets(str(out))}
    assert got["step-h64"] == ("H=64 T=64: 0.90x (crossover-on), H=64 T=256: 0.90x (crossover-on)", "MET")
    assert got["step-h256-512"][1] == "NOT MET" and "H=512 T=256: 0.36x (crossover-off)" in got["step-h256-512"][0]
    assert got["step-h1024"] == ("H=1024 T=64: 0.60x (record) (1 of 2 cells)", "NOT MEASURED")
    assert got["step-h2048"][1] == "MET"
    assert got["floor-h2048"] == ("H=2048 T=64: 1.14x (1 of 2 cells)", "NOT MEASURED")
    assert got["host-us"][1] == "NOT MET" and "H=1024 T=64: 9.50 us" in got["host-us"][0]
    assert got["bf16"][1] == "MET"                                    # 1.0x is within <= 1.0x
    assert got["train-bitwise"] == ("2 of 2 passed", "MET")
    assert got["resume"][1] == "NOT MET" and "ctrl_c_then_resume" in got["resume"][0]
    text = gpu_report.build(str(out))
    assert "| CuPy train step <= 1.0x cuDNN at H=2048 | H=2048 T=64: 0.99x (record), H=2048 T=256: 0.99x (record) " \
           "| **MET** |" in text
    assert "| tests-train | tests/test_train.py | 1 | 3 | 1 | 0 | 0 |" in text


def test_the_numpy_column_comes_from_the_committed_cpu_run(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    _write(out, "record", [_row(256, 64, step_ms=2.0, step_tokens_per_s=64 * 64 / 2e-3)])
    cpu = json.loads(open(os.path.join(ROOT, gpu_plan.NUMPY_RESULTS)).read())
    n = next(r for r in cpu["rows"] if r["backend"] == "numpy" and r["layers"] == 1 and (r["H"], r["T"]) == (256, 64))
    line = next(s for s in gpu_report.build(str(out)).splitlines() if s.startswith("| 256 | 64 | 64 |"))
    assert f"| {gpu_report.fmt(n['step_ms'])} (B={n['B']}) |" in line
    assert f"| {(64 * 64 / 2e-3) / n['step_tokens_per_s']:.0f}x |" in line


def test_train_summary_from_a_real_run(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    r = subprocess.run([sys.executable, "-m", "xlstm", "train", "--backend", "numpy", "--steps", "12",
                        "--eval-every", "12", "--save-every", "1000000", "--log-every", "2", "--no-progress",
                        "--out", str(tmp_path / "run"), "--max-chars", "20000", "--hidden", "8"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    os.replace(tmp_path / "run" / "metrics.jsonl", out / "train-float32-metrics.jsonl")
    res = gpu_report.train_summary(str(out), "train-float32", 0)
    recs = [json.loads(s) for s in (out / "train-float32-metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["split"] == "train" and x["step"] >= 4]
    assert res["steady_from_step"] == 4 == train[0]["step"] and res["steps"] == 12
    assert res["steps_per_s"] == pytest.approx((12 - 4) / (train[-1]["elapsed_s"] - train[0]["elapsed_s"]))
    assert res["final_val_loss"] == [x for x in recs if x["split"] == "val"][-1]["loss"]
    assert json.loads((out / "train-float32.json").read_text()) == res
