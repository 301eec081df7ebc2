"""Backend registry, and what callers keep of NumPy arrays (the ops themselves: tests/ops)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import xlstm
from xlstm.backends import backend_of, get_backend, resolve
from xlstm.errors import BackendUnavailableError, InputError


# -- registry ----------------------------------------------------------------------------------
def test_numpy_always_available_and_use_backend_restores():
    assert "numpy" in xlstm.available_backends()
    before = get_backend()
    with xlstm.use_backend("numpy") as b:
        assert get_backend() is b and b.name == "numpy" and b.xp is np
    assert get_backend() is before


def test_unknown_backend_name():
    with pytest.raises(InputError, match="one of"):
        xlstm.set_backend("tpu")


def test_models_live_on_the_backend_they_were_built_on():
    with xlstm.use_backend("numpy"):
        m = xlstm.LSTM(2, 3)
    assert m.backend.name == "numpy" and backend_of(m.params["l0.W"]).name == "numpy"


def test_env_var_selects_default_backend():
    env = dict(os.environ, XLSTM_BACKEND="numpy")
    out = subprocess.run([sys.executable, "-c", "import xlstm; print(xlstm.get_backend().name)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"
    env["XLSTM_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", "import xlstm; xlstm.get_backend()"], env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "bogus" in out.stderr


def test_explicit_cupy_without_gpu_raises_with_reason():
    reason = xlstm.backends.cupy_unavailable_reason()
    if reason is None:
        assert resolve("cupy").name == "cupy"          # a GPU machine: it must work
        return
    with pytest.raises(BackendUnavailableError) as e:
        xlstm.set_backend("cupy")
    assert reason in str(e.value) and "numpy" in str(e.value)
    assert get_backend().name == "numpy"                 # the failed switch changed nothing


# -- arrays kept on the host own their memory --------------------------------------------------
def test_to_numpy_copy_owns_its_memory():
    be = xlstm.backends.resolve("numpy")
    a = np.arange(6.0).reshape(2, 3)
    assert be.to_numpy(a) is a or np.shares_memory(be.to_numpy(a), a)   # the documented view
    kept = be.to_numpy(a, copy=True)
    a += 1
    np.testing.assert_array_equal(kept, np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("D,H", [(1, 3), (2, 1), (1, 1), (3, 2)])
def test_what_callers_keep_does_not_follow_later_training(D, H):
    """state_dict, to_torch_state_dict (params and grads) and the optimizer's state_dict are
    snapshots: a later backward/step must not change them. (With D or H = 1 the transposed
    weights were views: ``np.ascontiguousarray(W.T)`` does not copy a [1,4H] array.)"""
    from xlstm import interop
    from xlstm.optim import Adam

    rng = np.random.default_rng(0)
    lstm = xlstm.LSTM(D, H, dtype="float64", seed=1)
    opt = Adam(lstm, lr=0.1)
    x, dy = rng.standard_normal((3, 2, D)), rng.standard_normal((3, 2, H))

    def train_step():
        lstm.forward(x)
        lstm.backward(dy)
        opt.step()

    train_step()
    kept = {"state_dict": lstm.state_dict(), "torch params": interop.to_torch_state_dict(lstm),
            "torch grads": interop.to_torch_state_dict(lstm, grads=True),
            "optimizer": {f"{k}/{b}": a for k, st in opt.state_dict()["state"].items() for b, a in st.items()}}
    frozen = {w: {k: v.copy() for k, v in d.items()} for w, d in kept.items()}
    for _ in range(2):
        train_step()
    for w, d in kept.items():
        for k, v in d.items():
            np.testing.assert_array_equal(v, frozen[w][k], err_msg=f"{w} {k} changed after training on")


def test_host_reads_are_floats_at_once_and_a_check_raises_at_once():
    from xlstm import checks
    be = xlstm.backends.resolve("numpy")
    with be.deferred() as reads:
        reads.put("a", np.float64(1.5))
        reads.put(("b", 2), np.array(2.0))
        with pytest.raises(xlstm.InputError, match="bad input"):
            checks.require(be, np.bool_(False), lambda: "bad input")      # not queued: at once
        with be.deferred() as inner:                                      # nested: its own queue
            assert be.pending is inner
        assert be.pending is reads
        assert reads.read() == {"a": 1.5, ("b", 2): 2.0} and reads.read() == {}
    assert be.pending is None
