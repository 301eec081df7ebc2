"""`xlstm train | sample | export | trace` as a new user meets them: short corpora, extending a
finished run, SIGTERM, the hints it prints, its messages for mistakes, the files it writes.
Every test runs the real command in a subprocess."""
import importlib.util
import math
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest
from support.cli import ROOT, TINY, gloo_missing, records, xlstm

from xlstm.app import checkpoint

SMALL = ["--hidden", "8", "--embed", "4", "--seq-len", "8", "--batch", "4", "--no-progress"]


def _env(**extra):
    env = dict(os.environ, XLSTM_BACKEND="numpy", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


# -- a short default corpus --------------------------------------------------------------------
def test_a_small_max_chars_trains_on_that_much_of_the_default_corpus(tmp_path):
    r = xlstm("train", "--max-chars", "3000", "--steps", "2", *SMALL, "--out", tmp_path / "r", check=0)
    assert "3,000 characters" in r.stdout


def test_a_max_chars_too_small_for_one_window_says_so_and_the_minimum(tmp_path):
    r = xlstm("train", "--max-chars", "100", "--steps", "2", "--out", tmp_path / "r", check=2)
    assert "no default corpus" not in r.stderr
    assert "corpus is too short" in r.stderr and "--max-chars 100" in r.stderr and "at least 2,381" in r.stderr
    xlstm("train", "--max-chars", "2381", "--steps", "1", "--hidden", "8", "--embed", "4", "--no-progress",
          "--out", tmp_path / "ok", check=0)          # the minimum it names is enough


# -- extending a run: a new schedule phase ---------------------------------------------------------
def _cosine(step, base, n):
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, step / n)))


def test_extending_a_finished_run_is_a_new_schedule_phase(corpus, tmp_path):
    opts = ["--text", corpus, *TINY, "--steps", "20", "--lr", "0.01"]
    a, b = tmp_path / "a", tmp_path / "b"
    xlstm("train", *opts, "--out", a, check=0)
    first = records(a)
    r = xlstm("train", "--resume", a, "--steps", "40", "--no-progress", check=0)
    assert "steps 21-40 are schedule phase 1" in r.stdout and "no warm-up" in r.stdout
    assert "done: 20 steps (21-40) in" in r.stdout
    recs = records(a)
    assert recs[:20] == first                                   # the planned steps kept their schedule
    ext = [x for x in recs if x["step"] > 20]
    assert [x["step"] for x in ext] == list(range(21, 41))
    assert all(x["phase"] == 1 for x in ext) and all("phase" not in x for x in first)
    for x in ext:       # the record of step s logs the rate step s ran with: cosine from the peak over 20 steps
        assert x["lr"] == pytest.approx(_cosine(x["step"] - 21, 0.01, 20), rel=1e-12), x
    assert ext[0]["lr"] == pytest.approx(0.01)
    sched = records(a, "schedule")
    assert sched == [{"split": "schedule", "step": 20, "phase": 1, "start": 20, "end": 40, "warmup": 0,
                      "lr": 0.01, "schedule": "cosine"}]
    # an extension interrupted and resumed equals the uninterrupted extension, bit for bit
    xlstm("train", *opts, "--out", b, check=0)
    xlstm("train", "--resume", b, "--steps", "40", "--no-progress", "--stop-after", "27", check=130)
    r = xlstm("train", "--resume", b, "--no-progress", check=0)
    assert "done: 13 steps (28-40)" in r.stdout
    assert [(x["loss"], x["lr"]) for x in records(b)] == [(x["loss"], x["lr"]) for x in recs]
    assert records(b, "schedule") == sched


def test_warmup_on_resume_sets_the_added_phases_warm_up(corpus, tmp_path):
    run = tmp_path / "r"
    xlstm("train", "--text", corpus, *TINY, "--steps", "10", "--out", run, check=0)
    r = xlstm("train", "--resume", run, "--steps", "8", "--warmup", "3", check=2)     # nothing added
    assert "--warmup on --resume" in r.stderr
    r = xlstm("train", "--resume", run, "--steps", "40", "--warmup", "3", "--no-progress", check=0)
    assert "3 warm-up steps" in r.stdout
    lrs = {x["step"]: x["lr"] for x in records(run)}
    assert [lrs[11], lrs[12], lrs[13]] == pytest.approx([0.005 / 3, 0.01 / 3, 0.005])


def test_resume_with_fewer_steps_than_done_says_where_the_run_is(corpus, tmp_path):
    run = tmp_path / "r"
    xlstm("train", "--text", corpus, *TINY, "--steps", "10", "--out", run, check=0)
    r = xlstm("train", "--resume", run, "--steps", "4", check=0)
    assert "10 of 4" not in r.stdout and "is at step 10" in r.stdout and "above 10" in r.stdout


# -- SIGTERM -------------------------------------------------------------------------------------
def _signal_when_logging(p, run, sig, lines=3, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(run / "metrics.jsonl") and len(open(run / "metrics.jsonl").readlines()) >= lines:
            break
        time.sleep(0.02)
    p.send_signal(sig)
    try:
        return p.communicate(timeout=timeout)
    finally:
        p.kill()


def test_sigterm_saves_a_checkpoint_and_exits_143(corpus, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "xlstm", "train", "--text", corpus, *TINY, "--steps", "100000",
                          "--save-every", "100000", "--out", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    out, err = _signal_when_logging(p, run, signal.SIGTERM)
    assert p.returncode == 143, out + err
    assert "Traceback" not in err and "stopped by SIGTERM at step" in out and "checkpoint saved" in out
    step = checkpoint.checkpoint_step(checkpoint.list_checkpoints(str(run))[0])
    assert step >= 3 and records(run)[-1]["step"] == step
    xlstm("train", "--resume", run, "--steps", step + 2, "--no-progress", check=0)
    assert records(run)[-1]["step"] == step + 2


@pytest.mark.skipif(gloo_missing() is not None, reason=str(gloo_missing()))
def test_sigterm_to_the_nproc_launcher_stops_every_process_at_one_step_and_saves(corpus, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "xlstm", "train", "--text", corpus, *TINY, "--steps", "100000",
                          "--save-every", "100000", "--out", str(run), "--nproc", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(OMP_NUM_THREADS="1"))
    out, err = _signal_when_logging(p, run, signal.SIGTERM, timeout=120)
    assert p.returncode == 143, out + err
    assert "Traceback" not in err and out.count("stopped by SIGTERM at step") == 1, out + err
    folder, _, meta = checkpoint.load_latest(str(run))      # rank 0 saved; the ranks agreed (digest check)
    assert meta["processes"] == 2 and records(run)[-1]["step"] == meta["step"]
    xlstm("train", "--resume", run, "--steps", meta["step"] + 2, "--no-progress", check=0)


# -- what it prints ------------------------------------------------------------------------------
def _hint(stdout):
    line = next(x for x in stdout.splitlines() if "sample with:" in x)
    return shlex.split(line.split("sample with:", 1)[1])


def test_the_sample_hint_runs_as_printed(corpus, tmp_path):
    # a corpus without the letters of 'def ': the hint has no prime; the tiny Python-like one keeps it
    text = tmp_path / "abc.txt"
    text.write_text("abc cab bca " * 400)
    r = xlstm("train", "--text", text, *SMALL, "--steps", "3", "--out", tmp_path / "a", check=0)
    cmd = _hint(r.stdout)
    assert cmd[:2] == ["xlstm", "sample"] and "--prime" not in cmd
    xlstm(*cmd[1:], "--seed", "0", check=0)
    r = xlstm("train", "--text", corpus, *SMALL, "--steps", "3", "--out", tmp_path / "b", check=0)
    cmd = _hint(r.stdout)
    assert "--prime" in cmd
    assert xlstm(*cmd[1:], "--seed", "0", check=0).stdout.startswith("def ")


@pytest.mark.parametrize("bad,says", [(["--batch", "32"], "cannot be split evenly over 3 processes"),
                                      (["--dist-timeout", "-1"], "--dist-timeout must be a positive number")])
def test_nproc_checks_options_once_before_starting_processes(corpus, tmp_path, bad, says):
    pytest.importorskip("torch")
    r = xlstm("train", "--text", corpus, *TINY, "--nproc", "3", *bad, "--out", tmp_path / "r", check=2)
    assert r.stderr.count(says) == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "exitcode" not in r.stderr and "process 0" not in r.stderr, r.stderr


@pytest.mark.skipif(gloo_missing() is not None, reason=str(gloo_missing()))
def test_nproc_prints_no_torchrun_banner(corpus, tmp_path):
    env = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-m", "xlstm", "train", "--text", corpus, *TINY, "--steps", "2",
                        "--out", str(tmp_path / "r"), "--nproc", "2"], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OMP_NUM_THREADS" not in r.stderr and "*****" not in r.stderr, r.stderr
    assert r.stdout.count("xlstm train:") == 1


def test_auto_backend_is_quiet_without_a_gpu_package(corpus, tmp_path):
    # cupy hidden from the process: a CPU-only installation, where 'auto' has nothing to explain
    code = ("import sys; sys.modules['cupy'] = None; from xlstm.app.cli import main; "
            f"sys.exit(main(['train', '--text', {corpus!r}, *{SMALL!r}, '--steps', '2', '--out', "
            f"{str(tmp_path / 'r')!r}, '--backend', 'auto']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backend 'auto'" not in r.stderr and "cupy" not in r.stderr, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy installed (without a usable GPU)")
def test_auto_backend_says_once_when_an_installed_cupy_cannot_run(corpus, tmp_path):
    from xlstm.backends import cupy_unavailable_reason
    if cupy_unavailable_reason() is None:
        pytest.skip("cupy can run here: 'auto' picks it and has nothing to explain")
    r = xlstm("train", "--text", corpus, *SMALL, "--steps", "2", "--out", tmp_path / "r", "--backend", "auto", check=0)
    assert r.stderr.count("cupy is installed but cannot run") == 1, r.stderr


# -- messages for mistakes -------------------------------------------------------------------------
def test_all_checkpoints_damaged_is_one_short_line_with_new_advice(corpus, tmp_path):
    run = tmp_path / "run"
    xlstm("train", "--text", corpus, *TINY, "--steps", "10", "--save-every", "5", "--out", run, check=0)
    for c in checkpoint.list_checkpoints(str(run)):
        raw = bytearray(open(os.path.join(c, "arrays.npz"), "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        open(os.path.join(c, "arrays.npz"), "wb").write(bytes(raw))
    r = xlstm("train", "--resume", run, check=2)
    last = r.stderr.strip().splitlines()[-1]
    assert "all 2 are damaged" in last and "start a new run" in last and len(last) < 400, last
    assert f"--resume {run}" not in last and "fall back" not in last


def test_trace_into_a_closed_pipe_ends_quietly():
    r = subprocess.run(f"{shlex.quote(sys.executable)} -m xlstm trace | head -5", shell=True, capture_output=True,
                       text=True, env=_env(), timeout=120)
    assert len(r.stdout.splitlines()) == 5
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_an_emulated_precision_run_prints_no_python_warning(corpus, tmp_path):
    r = xlstm("train", "--text", corpus, *SMALL, "--steps", "2", "--precision", "bf16", "--out", tmp_path / "r",
              check=0)
    assert "EMULATED" in r.stdout
    assert "Warning" not in r.stderr and "warn(" not in r.stderr, r.stderr


def test_resume_with_text_names_the_default_corpus_not_none(tmp_path, corpus):
    run = tmp_path / "r"
    xlstm("train", "--max-chars", "20000", *SMALL, "--steps", "1", "--out", run, check=0)
    r = xlstm("train", "--resume", run, "--text", corpus, check=2)
    assert "None" not in r.stderr and "the default corpus (no --text)" in r.stderr, r.stderr


def test_help_gives_the_warmup_default_the_code_uses():
    out = " ".join(xlstm("train", "--help", check=0).stdout.split())
    assert "default min(50, steps/10)" in out


def test_a_misspelt_option_shows_the_subcommands_usage_and_the_closest_option():
    r = xlstm("train", "--hiden", "5", check=2)
    assert r.stderr.startswith("usage: xlstm train"), r.stderr
    assert "--hiden" in r.stderr and "did you mean --hidden?" in r.stderr


def test_sample_refuses_bad_arguments_before_reading_the_checkpoint(tmp_path):
    r = xlstm("sample", tmp_path / "nothing-here", "--length", "-5", check=2)
    assert "--length" in r.stderr and "no checkpoint" not in r.stderr


def test_a_binary_file_is_refused_whatever_the_encoding(tmp_path):
    binary = tmp_path / "ls"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)
    for enc in ("utf-8", "latin-1"):
        r = xlstm("train", "--text", binary, "--encoding", enc, "--out", tmp_path / enc, check=2)
        assert "binary" in r.stderr and "latin-1" not in r.stderr, r.stderr


# -- the files of a run -------------------------------------------------------------------------------
def test_every_file_of_a_run_has_the_same_permissions(corpus, tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    xlstm("train", "--text", corpus, *TINY, "--steps", "4", "--save-every", "2", "--out", run, check=0)
    xlstm("train", "--resume", run, "--steps", "6", "--no-progress", check=0)    # metrics rewritten on resume
    xlstm("export", run, "--to", "torch", check=0)
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert {"metrics.jsonl", "latest", "lstm-torch.pt"} <= set(modes)
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_xlstm_load_returns_the_trained_model_and_its_vocabulary(corpus, tmp_path):
    run = tmp_path / "run"
    xlstm("train", "--text", corpus, *TINY, "--steps", "4", "--out", run, check=0)
    code = f"""
import numpy as np, xlstm
model, vocab, meta, folder = xlstm.load({str(run)!r}, backend="numpy")
ids = vocab.encode(list("def x"))
logits = model.forward(ids[:, None])
assert logits.shape == (5, 1, len(vocab)) and vocab.decode(ids) == "def x" and meta["step"] == 4
print(folder)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ckpt-000004"), r.stdout + r.stderr
