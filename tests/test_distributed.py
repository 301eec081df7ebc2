"""Data-parallel `xlstm train` over torch.distributed: gloo on the CPU, 2 processes on 127.0.0.1.

What must hold: W processes with the global batch B give the 1-process run (up to the rounding
of the split gradient sums), bitwise the same on every repeat; checkpoints resume on any number
of processes; a dead or hung process stops the run with a message and a non-zero exit code,
the last checkpoint intact. Processes are started two ways: through torchrun (``--nproc``, the
user's way) and directly with torchrun's environment variables (so a test can kill or stop one).
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from support.cli import gloo_missing
from xlstm.app import checkpoint, distributed
from xlstm.errors import InputError, StateError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "24", "--embed", "8", "--seq-len", "12", "--batch", "4", "--eval-every", "5",
        "--log-every", "1", "--no-progress", "--max-chars", "1200"]
# 25 steps of 22 per epoch cross an epoch (state reset, new offset); dropout and zoneout draw masks
RUN = [*TINY, "--steps", "25", "--save-every", "5", "--keep", "9", "--dropout", "0.1", "--zoneout", "0.1"]
RTOL = {"float32": 1e-6, "float64": 1e-12}      # relative to each array's max |value|


needs_gloo = pytest.mark.skipif(gloo_missing() is not None, reason=str(gloo_missing()))


def _env(**extra):
    return dict(os.environ, XLSTM_BACKEND="numpy", OMP_NUM_THREADS="1",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def xlstm(*argv, check=None):
    r = subprocess.run([sys.executable, "-m", "xlstm", *map(str, argv)], capture_output=True, text=True,
                       env=_env(), timeout=180)
    assert "Traceback" not in r.stderr, r.stderr
    if check is not None:
        assert r.returncode == check, r.stdout + r.stderr
    return r


def start_ranks(argv, world=2):
    """The W processes of one run, started as torchrun would (its environment variables)."""
    port = str(distributed.free_port())
    return [subprocess.Popen([sys.executable, "-m", "xlstm", *map(str, argv)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for r in range(world)]


def finish(procs, timeout=120):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        finally:
            p.kill()
        outs.append((p.returncode, out, err))
    return outs


def arrays(folder):
    return checkpoint.load(str(folder))[0]


def losses(run, split="train"):
    import json
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in recs if r["split"] == split]


def assert_close(a, b, rtol):
    """Every array of checkpoint a equals b's to rtol * max|b| (bitwise when rtol is 0)."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if rtol == 0:
            assert np.array_equal(a[k], b[k]), k
        else:
            err = np.abs(a[k].astype(np.float64) - b[k]).max()
            assert err <= rtol * np.abs(b[k]).max(), (k, err, np.abs(b[k]).max())


def assert_losses_close(a, b, rtol):
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=rtol, atol=0)


# -- no torch, and pieces that need no second process ------------------------------------------
def test_single_process_training_does_not_import_torch(corpus, tmp_path):
    code = ("import sys; from xlstm.app.cli import main; "
            f"rc = main(['train', '--text', {corpus!r}, *{TINY!r}, '--steps', '3', '--out', {str(tmp_path / 'r')!r}]); "
            "print('exit', rc, 'torch imported:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.stdout.strip().endswith("exit 0 torch imported: False"), r.stdout + r.stderr


def test_shard_splits_rows_contiguously_and_completely():
    for n in (1, 4, 7, 64):
        for world in (1, 2, 3, 5):
            parts = [distributed.shard(n, r, world) for r in range(world)]
            rows = [i for s in parts for i in range(n)[s]]
            assert rows == list(range(n))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) - min(sizes) <= 1
    assert distributed.shard(8, 1, 2) == slice(4, 8)


def test_strip_nproc():
    assert distributed.strip_nproc(["train", "--nproc", "2", "--steps", "3"]) == ["train", "--steps", "3"]
    assert distributed.strip_nproc(["train", "--nproc=4", "--out", "d"]) == ["train", "--out", "d"]


def test_flat_gradient_buffer_keeps_backward_and_zero_grad_working():
    from xlstm.losses import cross_entropy
    from xlstm.app.train import DEFAULTS, build_model

    cfg = dict(DEFAULTS, hidden=6, embed=3, layers=2)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 7, (5, 3)), rng.integers(0, 7, (5, 3))

    def grads(model):
        model.zero_grad()
        model.backward(cross_entropy(model.forward(x), y)[1])
        return {k: np.array(v) for k, v in model.grads.items()}

    ref, flat = build_model(cfg, 7, "numpy"), build_model(cfg, 7, "numpy")
    want = grads(ref)
    flat.grads["0.E"][...] = 1.0        # the buffer starts from the current gradients
    flat_grads = distributed.FlatGrads(flat)
    (buf,) = flat_grads.buffers
    assert buf.size == sum(v.size for v in want.values()) and np.all(buf[:flat.grads["0.E"].size] == 1.0)
    got = grads(flat)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
        assert np.shares_memory(flat.grads[k], buf), k
    buf_sum = sum(float(np.abs(v).sum()) for v in got.values())
    assert float(np.abs(buf).sum()) == pytest.approx(buf_sum)       # the buffer is what backward wrote
    flat.zero_grad()
    assert not buf.any()
    flat_grads.check()
    flat[2].grads["b"] = np.zeros_like(flat[2].grads["b"])     # a backward that replaced its array
    with pytest.raises(StateError, match=r"Dense.grads\['b'\].*in place"):
        flat_grads.check()


def test_parameter_digest_check_catches_a_difference():
    from xlstm.app.train import DEFAULTS, build_model

    m = build_model(dict(DEFAULTS, hidden=4, embed=2), 5, "numpy")
    d0 = distributed.params_digest(m)
    distributed.check_same([d0, d0], step=3)
    m.params["1.l0.U"][0, 0] = np.nextafter(m.params["1.l0.U"][0, 0], np.float32(np.inf))
    d1 = distributed.params_digest(m)
    assert d1 != d0
    with pytest.raises(distributed.DistributedError, match="step 3"):
        distributed.check_same([d0, d1], step=3)


def test_nproc_must_be_positive():
    for bad in (0, -2):
        with pytest.raises(InputError, match="--nproc must be a positive integer"):
            distributed.launch(bad, ["train"])


def test_nproc_without_torch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)         # `import torch` now fails as if not installed
    with pytest.raises(InputError, match=r"xlstm-bptt\[distributed\]"):
        distributed.launch(2, ["train"])


def test_bad_dist_timeout(capsys, corpus, tmp_path):
    from xlstm.app.cli import main
    assert main(["train", "--text", corpus, "--dist-timeout", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--dist-timeout" in capsys.readouterr().err


def test_more_processes_than_gpus_is_refused(monkeypatch):
    cupy = pytest.importorskip("cupy")
    from xlstm.backends import cupy_backend
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 2)
    with pytest.raises(InputError, match="process 2 on this machine has no GPU of its own: the machine has 2"):
        cupy_backend.use_device(2)


@needs_gloo
def test_env_without_a_rendezvous_address_says_how_to_start(corpus, tmp_path):
    env = {k: v for k, v in _env(RANK="0", WORLD_SIZE="1").items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-m", "xlstm", "train", "--text", corpus, "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "MASTER_ADDR" in r.stderr and "torchrun" in r.stderr and "Traceback" not in r.stderr


# -- 2 processes (gloo) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Uninterrupted runs: 1 process and 2 processes (torchrun), float32 and float64."""
    base = tmp_path_factory.mktemp("dp")
    if gloo_missing():
        pytest.skip(gloo_missing())
    out = {}
    for dt in ("float32", "float64"):
        out[1, dt], out[2, dt] = base / f"one-{dt}", base / f"two-{dt}"
        xlstm("train", "--text", corpus, *RUN, "--dtype", dt, "--out", out[1, dt], check=0)
        r = xlstm("train", "--text", corpus, *RUN, "--dtype", dt, "--out", out[2, dt], "--nproc", "2", check=0)
        assert "data-parallel on 2 processes (gloo): 2 streams each" in r.stdout
        assert r.stdout.count("done: 25 steps") == 1        # rank 0 alone reports
    return out


@needs_gloo
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_two_processes_equal_one_process(runs, dtype):
    one, two = runs[1, dtype], runs[2, dtype]
    assert_close(arrays(two / "ckpt-000025"), arrays(one / "ckpt-000025"), RTOL[dtype])
    assert_close(arrays(two / "ckpt-000010"), arrays(one / "ckpt-000010"), RTOL[dtype])
    assert_losses_close(losses(two), losses(one), RTOL[dtype])
    assert_losses_close(losses(two, "val"), losses(one, "val"), RTOL[dtype])
    assert checkpoint.load(str(two / "ckpt-000025"))[1]["processes"] == 2
    # not vacuous: the two runs really took different arithmetic paths
    if dtype == "float32":
        assert not np.array_equal(arrays(two / "ckpt-000025")["param/1.l0.U"],
                                  arrays(one / "ckpt-000025")["param/1.l0.U"])


@needs_gloo
def test_two_identical_two_process_runs_are_bitwise_equal(runs, corpus, tmp_path):
    again = tmp_path / "again"
    outs = finish(start_ranks(["train", "--text", corpus, *RUN, "--out", again]))
    assert [c for c, _, _ in outs] == [0, 0], outs
    assert outs[1][1] == ""                     # rank 1 prints nothing
    for step in (5, 25):
        assert_close(arrays(again / f"ckpt-{step:06d}"), arrays(runs[2, "float32"] / f"ckpt-{step:06d}"), 0)
    assert losses(again) == losses(runs[2, "float32"])


@needs_gloo
def test_resume_two_processes_on_one_and_one_on_two(runs, corpus, tmp_path):
    one = runs[1, "float64"]
    a, b = tmp_path / "two-then-one", tmp_path / "one-then-two"
    r = xlstm("train", "--text", corpus, *RUN, "--dtype", "float64", "--out", a, "--nproc", "2", "--stop-after", "12",
              check=130)
    assert "interrupted at step 12" in r.stdout
    r = xlstm("train", "--resume", a, "--no-progress", check=0)
    assert "resuming from" in r.stdout and "ckpt-000012" in r.stdout
    xlstm("train", "--text", corpus, *RUN, "--dtype", "float64", "--out", b, "--stop-after", "12", check=130)
    outs = finish(start_ranks(["train", "--resume", b, "--no-progress"]))
    assert [c for c, _, _ in outs] == [0, 0], outs
    for run in (a, b):
        assert_close(arrays(run / "ckpt-000025"), arrays(one / "ckpt-000025"), RTOL["float64"])
        assert_losses_close(losses(run), losses(one), RTOL["float64"])


def _wait_for(pred, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _long_run(corpus, run, *extra):
    procs = start_ranks(["train", "--text", corpus, *TINY, "--steps", "100000", "--save-every", "5",
                         "--out", run, *extra])
    assert _wait_for(lambda: len(checkpoint.list_checkpoints(str(run))) >= 1), finish(procs, 5)
    return procs


@needs_gloo
def test_killing_one_process_stops_the_run_with_a_message(corpus, tmp_path):
    run = tmp_path / "run"
    procs = _long_run(corpus, run)
    procs[1].send_signal(signal.SIGKILL)
    (code, out, err), _ = finish(procs, 60)
    assert code == 1, out + err
    assert "Traceback" not in err and "error:" in err and "another process of this run stopped" in err
    assert "intact" in err and f"--resume {run}" in err
    folder, _, meta = checkpoint.load_latest(str(run))          # verified: hash and arrays
    assert meta["step"] >= 5
    xlstm("train", "--resume", run, "--steps", meta["step"] + 2, check=0)    # and it continues


def _children(pid):
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def _rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
    except OSError:
        return None
    return env.get(b"RANK", b"").decode() or None


@needs_gloo
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds the worker processes through Linux's /proc")
def test_killing_a_worker_under_torchrun_ends_the_launcher_with_a_message(corpus, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "xlstm", "train", "--text", corpus, *TINY, "--steps", "100000",
                          "--save-every", "5", "--out", str(run), "--nproc", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert _wait_for(lambda: len(checkpoint.list_checkpoints(str(run))) >= 1)
        ranks = {_rank_of(c): c for c in _children(p.pid)}
        os.kill(ranks["1"], signal.SIGKILL)
        out, err = p.communicate(timeout=90)
    finally:
        p.kill()
    assert p.returncode == 1, out + err
    assert "process 1 of 2 was killed by signal SIGKILL; torchrun stopped the others" in err
    assert "Traceback" not in err
    checkpoint.load_latest(str(run))


@needs_gloo
def test_a_hung_process_times_out(corpus, tmp_path):
    run = tmp_path / "run"
    procs = _long_run(corpus, run, "--dist-timeout", "3")
    procs[1].send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        out, err = procs[0].communicate(timeout=60)
        waited = time.time() - t0
    finally:
        procs[1].kill()
        finish(procs)
    assert procs[0].returncode == 1, out + err
    assert "--dist-timeout 3 s" in err and "Traceback" not in err
    assert 2.5 < waited < 30
    checkpoint.load_latest(str(run))


@needs_gloo
def test_a_batch_that_does_not_split_evenly_is_refused(corpus, tmp_path):
    outs = finish(start_ranks(["train", "--text", corpus, *TINY, "--batch", "5", "--out", tmp_path / "r"]))
    for code, out, err in outs:
        assert code == 2 and "--batch 5" in err and "multiple of 2" in err, (code, out, err)
        assert "Traceback" not in err
    assert not checkpoint.list_checkpoints(str(tmp_path / "r"))


# -- GPU: NCCL ------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_one_rank_nccl_run_equals_a_plain_run(corpus, tmp_path):
    torch = pytest.importorskip("torch")
    if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
        pytest.skip("needs a CUDA build of torch with NCCL")
    opts = ["--text", corpus, *RUN, "--dtype", "float64", "--backend", "cupy"]
    xlstm("train", *opts, "--out", tmp_path / "plain", check=0)
    r = xlstm("train", *opts, "--out", tmp_path / "nccl", "--nproc", "1", check=0)
    assert "done: 25 steps" in r.stdout
    # one rank: the all-reduce adds nothing and divides by 1, so only GPU nondeterminism could differ
    assert_close(arrays(tmp_path / "nccl" / "ckpt-000025"), arrays(tmp_path / "plain" / "ckpt-000025"), 1e-12)


def test_both_process_groups_provide_the_protocol():
    proto = distributed.ProcessGroup
    methods = [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]
    assert {"allreduce_grads", "sum", "any", "broadcast", "gather_streams", "draw_masks"} <= set(methods)
    for cls in (distributed.Single, distributed.TorchGroup):
        assert all(callable(getattr(cls, n, None)) for n in methods), cls
    s = distributed.Single()
    assert all(hasattr(s, a) for a in proto.__annotations__)
