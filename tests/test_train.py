"""`xlstm train | sample | export` end to end, through the command line, on a tiny corpus."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from support.cli import TINY, records, xlstm

from xlstm.app import checkpoint
from xlstm.app.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def test_end_to_end_loss_falls(corpus, tmp_path):
    run = tmp_path / "run"
    r = xlstm("train", "--text", corpus, *TINY, "--steps", "60", "--lr", "0.02", "--out", run, check=0)
    assert "unigram entropy" in r.stdout and "final val loss" in r.stdout
    train = [x["loss"] for x in records(run)]
    val = [x["loss"] for x in records(run, "val")]
    assert len(train) == 60 and len(val) == 12
    assert np.mean(train[-5:]) < 0.85 * np.mean(train[:3])
    meta = checkpoint.load(str(run / "ckpt-000060"))[1]
    assert val[-1] < 0.8 * val[0] and val[-1] < meta["unigram_entropy"]
    assert checkpoint.list_checkpoints(str(run))[0].endswith("ckpt-000060")


def _params(folder):
    arrays, _ = checkpoint.load(folder)
    return {k: v for k, v in arrays.items() if not k.startswith("carry/")}


def test_interrupt_and_resume_equals_uninterrupted_bit_for_bit(corpus, tmp_path):
    # zoneout and dropout draw masks, and 30 steps of 22 per epoch cross an epoch (state reset,
    # new random offset): every RNG and the carried state must be restored
    opts = ["--text", corpus, "--max-chars", "1200", *TINY, "--steps", "30", "--save-every", "4",
            "--zoneout", "0.1", "--dropout", "0.1"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = xlstm("train", *opts, "--out", a, check=0)
    assert "(1.36 epochs)" in r.stdout
    r = xlstm("train", *opts, "--out", b, "--stop-after", "7", check=130)
    assert "interrupted at step 7" in r.stdout and "--resume" in r.stdout
    assert os.path.isdir(b / "ckpt-000007")
    r = xlstm("train", "--resume", b, "--no-progress", "--stop-after", "25", check=130)  # past the epoch end
    assert "resuming from" in r.stdout and "interrupted at step 25" in r.stdout
    xlstm("train", "--resume", b, "--no-progress", check=0)
    la, lb = records(a), records(b)
    assert [x["step"] for x in lb] == list(range(1, 31))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]          # exact float equality
    assert [x["loss"] for x in records(a, "val")] == [x["loss"] for x in records(b, "val")]
    pa, pb = _params(a / "ckpt-000030"), _params(b / "ckpt-000030")
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)


def ctrl_c_train(run, *argv, lines=3, timeout=60):
    """Start ``xlstm train *argv --out run``, press Ctrl-C once ``lines`` metrics are written
    (or when it ends first); returns (exit code, stdout, stderr)."""
    env = dict(os.environ, XLSTM_BACKEND="numpy", PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "xlstm", "train", *map(str, argv), "--out", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and p.poll() is None:
            if os.path.exists(run / "metrics.jsonl") and len(open(run / "metrics.jsonl").readlines()) >= lines:
                break
            time.sleep(0.01)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=timeout)
    finally:
        p.kill()
    return p.returncode, out, err


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(corpus, tmp_path):
    run = tmp_path / "run"
    rc, out, err = ctrl_c_train(run, "--text", corpus, *TINY, "--steps", "100000", "--save-every", "100000")
    assert rc == 130, out + err
    assert "Traceback" not in err and "checkpoint saved" in out
    step = checkpoint.checkpoint_step(checkpoint.list_checkpoints(str(run))[0])
    assert step >= 3
    xlstm("train", "--resume", run, "--steps", step + 2, "--no-progress", check=0)
    assert records(run)[-1]["step"] == step + 2


def test_corrupted_checkpoint_is_refused_and_the_previous_good_one_still_loads(corpus, tmp_path):
    run = tmp_path / "run"
    xlstm("train", "--text", corpus, *TINY, "--steps", "10", "--save-every", "5", "--out", run, check=0)
    bad = run / "ckpt-000010" / "arrays.npz"
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    r = xlstm("sample", run / "ckpt-000010", "--length", "5", check=2)
    assert str(bad) in r.stderr and "corrupted" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = xlstm("sample", run / "ckpt-000005", "--length", "5", "--seed", "0", check=0)
    r = xlstm("sample", run, "--length", "5", "--seed", "0", check=0)          # a run folder falls back
    assert "skipping" in r.stderr and "ckpt-000005" in r.stderr
    r = xlstm("train", "--resume", run, "--no-progress", check=0)             # and so does --resume
    assert "resuming from" in r.stdout and "ckpt-000005" in r.stdout
    checkpoint.load(str(run / "ckpt-000010"))                              # rewritten, good again


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    xlstm("train", "--text", corpus, *TINY, "--steps", "30", "--lr", "0.02", "--out", run, check=0)
    return run


def test_sampling_is_reproducible_with_a_seed(trained):
    args = ["sample", trained, "--prime", "def ", "--length", "60", "--temperature", "0.9", "--top-k", "5"]
    a = xlstm(*args, "--seed", "1", check=0).stdout
    b = xlstm(*args, "--seed", "1", check=0).stdout
    c = xlstm(*args, "--seed", "2", check=0).stdout
    assert a == b and a.startswith("def ") and len(a) == len("def ") + 60 + 1
    assert a != c
    greedy = xlstm("sample", trained, "--prime", "def", "--length", "20", "--temperature", "0", check=0).stdout
    assert greedy == xlstm("sample", trained, "--prime", "def", "--length", "20", "--temperature", "0").stdout


def test_export_to_torch_matches_the_lstm(trained, tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "lstm.pt"
    xlstm("export", trained, "--to", "torch", "--output", out, check=0)
    from xlstm.app.checkpoint import load_model
    model, vocab, meta, _ = load_model(str(trained), backend="numpy")
    lstm = model[1]
    t = torch.nn.LSTM(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers)
    saved = torch.load(out)
    t.load_state_dict(saved["lstm"])
    assert saved["vocab"] == {"level": vocab.level, "tokens": vocab.tokens}
    x = np.random.default_rng(0).standard_normal((5, 2, lstm.input_size)).astype(np.float32)
    y, _ = lstm.forward(x)
    ty, _ = t(torch.from_numpy(x))
    np.testing.assert_allclose(ty.detach().numpy(), y, rtol=1e-4, atol=1e-5)


def test_the_printed_full_export_loader_runs_and_gives_the_models_logits(trained, tmp_path):
    # the lines `xlstm export --full` prints, run as they are, then the torch modules they build
    # give the xlstm model's logits, and ids map back to text through the exported vocabulary
    pytest.importorskip("torch")
    full = tmp_path / "full.pt"
    r = xlstm("export", trained, "--to", "torch", "--full", "--output", full, check=0)
    code = r.stdout.split("load it with:\n", 1)[1]
    code = "\n".join(line[4:] for line in code.splitlines() if line.startswith("    "))
    check = f"""
import json, numpy as np
from xlstm.app.checkpoint import load_model
model, vocab, meta, _ = load_model({str(trained)!r}, backend="numpy")
ids = vocab.encode(list("def x"))
want = model.forward(ids[:, None])
h, _ = lstm(embedding(torch.from_numpy(ids)[:, None]))
got = decoder(h).detach().numpy()
assert np.abs(got - want).max() < 1e-4 * np.abs(want).max(), np.abs(got - want).max()
assert "".join(tokens[i] for i in ids) == "def x"
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


def test_word_level_with_epochs(corpus, tmp_path):
    run = tmp_path / "run"
    r = xlstm("train", "--text", corpus, "--level", "word", "--vocab-size", "8", *TINY, "--epochs", "1",
              "--out", run, check=0)
    assert "word level" in r.stdout and "vocabulary 8" in r.stdout
    meta = checkpoint.load(checkpoint.list_checkpoints(str(run))[0])[1]
    assert meta["vocab"]["tokens"][0] == "<unk>" and meta["step"] >= 1
    out = xlstm("sample", run, "--prime", "def self", "--length", "10", "--seed", "0", check=0).stdout
    assert out.startswith("def self")


def test_plot_writes_a_png(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    xlstm("train", "--text", corpus, *TINY, "--steps", "10", "--out", run, "--plot", check=0)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- bad input: a clear one-line message and exit code 2, never a traceback -------------------
def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def test_missing_empty_and_undecodable_text(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--text", tmp_path / "nope.txt", "--out", tmp_path / "r")
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty.txt").write_text("")
    code, err = run_cli(capsys, "train", "--text", tmp_path / "empty.txt", "--out", tmp_path / "r")
    assert code == 2 and "is empty" in err
    (tmp_path / "bin.txt").write_bytes(b"abc \xff\xfe def")
    code, err = run_cli(capsys, "train", "--text", tmp_path / "bin.txt", "--out", tmp_path / "r")
    assert code == 2 and "not valid utf-8" in err and "--encoding" in err


def test_corpus_shorter_than_one_window(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("hello world\n")
    code, err = run_cli(capsys, "train", "--text", tmp_path / "short.txt", "--out", tmp_path / "r")
    assert code == 2 and "too short" in err and "--seq-len" in err


@pytest.mark.parametrize("opt,value", [("--hidden", 0), ("--layers", -1), ("--seq-len", 0), ("--batch", -4),
                                       ("--steps", 0), ("--lr", -0.1), ("--lr", 0), ("--embed", 0),
                                       ("--epochs", -1), ("--val-fraction", 0), ("--dropout", 1.5),
                                       ("--save-every", 0), ("--clip", 0), ("--threads", -1)])
def test_nonsensical_sizes(capsys, corpus, tmp_path, opt, value):
    code, err = run_cli(capsys, "train", "--text", corpus, opt, value, "--out", tmp_path / "r")
    assert code == 2 and opt in err
    assert not os.path.exists(tmp_path / "r")


def test_steps_and_epochs_together(capsys, corpus, tmp_path):
    code, err = run_cli(capsys, "train", "--text", corpus, "--steps", "3", "--epochs", "1", "--out", tmp_path / "r")
    assert code == 2 and "--steps or --epochs" in err


def test_export_refuses_a_layer_norm_model(capsys, corpus, tmp_path):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    assert main(["train", "--text", corpus, *TINY, "--steps", "2", "--layer-norm", "--out", str(run)]) == 0
    capsys.readouterr()
    code, err = run_cli(capsys, "export", run, "--to", "torch")
    assert code == 2 and "--layer-norm" in err


def test_sample_bad_arguments(capsys, trained):
    for argv, what in ((["--length", "-1"], "--length"), (["--temperature", "-1"], "--temperature"),
                       (["--top-k", "0"], "--top-k"), (["--prime", "\u2603"], "vocabulary")):
        code, err = run_cli(capsys, "sample", trained, *argv)
        assert code == 2 and what in err, err


def test_resume_with_an_incompatible_config(capsys, corpus, trained, tmp_path):
    code, err = run_cli(capsys, "train", "--resume", trained, "--hidden", "64", "--out", tmp_path / "r")
    assert code == 2 and "--hidden 24" in err and "--hidden 64" in err
    code, err = run_cli(capsys, "train", "--text", corpus, *TINY, "--out", trained)
    assert code == 2 and "already holds checkpoints" in err and "--resume" in err


def test_checkpoint_whose_arrays_do_not_fit_its_config(capsys, corpus, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--text", corpus, *TINY, "--steps", "2", "--out", str(run)]) == 0
    meta_path = run / "ckpt-000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["hidden"] = 16
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    code, err = run_cli(capsys, "sample", run / "ckpt-000002")
    assert code == 2 and "does not fit its own config" in err
    code, err = run_cli(capsys, "sample", tmp_path)
    assert code == 2 and "no checkpoint in" in err


def test_resume_with_a_changed_corpus(capsys, trained, tmp_path):
    meta = json.loads(open(os.path.join(checkpoint.list_checkpoints(str(trained))[0], "meta.json")).read())
    other = tmp_path / "other.txt"
    other.write_text(open(meta["config"]["text"]).read() + "more\n")
    code, err = run_cli(capsys, "train", "--resume", trained, "--text", other, "--out", tmp_path / "r")
    assert code == 2 and "--text" in err


def test_backend_cupy_without_a_gpu(capsys, corpus, tmp_path):
    from xlstm.backends import cupy_unavailable_reason
    if cupy_unavailable_reason() is None:
        pytest.skip("a usable GPU is present, so there is no missing-GPU error to check on this machine")
    code, err = run_cli(capsys, "train", "--text", corpus, "--backend", "cupy", "--out", tmp_path / "r")
    assert code == 2 and "cupy" in err and "numpy" in err
    code, err = run_cli(capsys, "sample", tmp_path, "--backend", "cupy")
    assert code == 2 and "cupy" in err


# -- the same on the GPU: determinism and exact resume with --backend cupy ---------------------------
def _gpu_opts(corpus, steps, *extra):
    return ["--backend", "cupy", "--text", corpus, "--max-chars", "1200", *TINY, "--steps", steps, *extra]


def _assert_same_run(a, b, steps):
    la, lb = records(a), records(b)
    assert [x["step"] for x in lb] == list(range(1, steps + 1))
    for key in ("loss", "grad_norm"):                                   # exact float equality
        assert [x[key] for x in la] == [x[key] for x in lb], key
    assert [x["loss"] for x in records(a, "val")] == [x["loss"] for x in records(b, "val")]
    pa, pb = _params(a / f"ckpt-{steps:06d}"), _params(b / f"ckpt-{steps:06d}")
    assert pa.keys() == pb.keys()
    differ = [k for k in pa if not np.array_equal(pa[k], pb[k])]
    assert not differ, f"parameters differ bitwise: {differ}"


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [[], ["--layer-norm", "--zoneout", "0.1", "--dropout", "0.1"]],
                         ids=["plain", "layernorm-dropout-zoneout"])
def test_gpu_two_runs_with_one_seed_are_bitwise_equal(corpus, tmp_path, extra):
    """On the device every gradient is summed in a fixed order (no atomics: the embedding's
    scatter-add was the culprit), so one seed gives one run, bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        r = xlstm("train", *_gpu_opts(corpus, 40, *extra), "--out", run, check=0)
        assert "backend cupy" in r.stdout
    _assert_same_run(a, b, 40)


@pytest.mark.gpu
def test_gpu_interrupt_and_resume_equals_uninterrupted_bit_for_bit(corpus, tmp_path):
    """As test_interrupt_and_resume_equals_uninterrupted_bit_for_bit, on the GPU."""
    opts = _gpu_opts(corpus, 30, "--save-every", "4", "--zoneout", "0.1", "--dropout", "0.1")
    a, b = tmp_path / "a", tmp_path / "b"
    xlstm("train", *opts, "--out", a, check=0)
    r = xlstm("train", *opts, "--out", b, "--stop-after", "7", check=130)
    assert "interrupted at step 7" in r.stdout
    xlstm("train", "--resume", b, "--backend", "cupy", "--no-progress", "--stop-after", "25", check=130)
    xlstm("train", "--resume", b, "--backend", "cupy", "--no-progress", check=0)
    _assert_same_run(a, b, 30)


@pytest.mark.gpu
def test_gpu_ctrl_c_then_resume_equals_uninterrupted(corpus, tmp_path):
    """A real SIGINT in the middle of a GPU run, then --resume: the same losses and parameters
    as the run that was never interrupted."""
    steps = 300
    opts = _gpu_opts(corpus, steps, "--save-every", "100000")
    a, b = tmp_path / "a", tmp_path / "b"
    xlstm("train", *opts, "--out", a, check=0)
    rc, out, err = ctrl_c_train(b, *opts, lines=5, timeout=120)
    assert rc == 130, "the run was not interrupted (finished first?): " + out + err
    step = checkpoint.checkpoint_step(checkpoint.list_checkpoints(str(b))[0])
    assert 5 <= step < steps
    xlstm("train", "--resume", b, "--backend", "cupy", "--no-progress", check=0)
    _assert_same_run(a, b, steps)
