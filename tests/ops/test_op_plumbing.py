"""The backends' plumbing that the ops use: the device-array test, the scratch cache, BLAS threads."""
from __future__ import annotations

import numpy as np
import pytest

from xlstm import ops
from xlstm.backends import blas, is_device_array, resolve
from xlstm.backends.scratch import Scratch


def test_is_device_array(host_lib, monkeypatch):
    from support.standin import install_fakes
    from xlstm import backends

    install_fakes(host_lib, monkeypatch, nvmath=True, counting=True)
    be = backends._cupy_backend()
    assert is_device_array(be.asarray(np.zeros(2))) and not is_device_array(np.zeros(2))
    assert not is_device_array([1.0]) and not is_device_array(None)


def test_scratch_reuses_by_key_and_stays_bounded():
    s = Scratch(np, limit=3)
    a = s.get("x", (2, 3), np.float32)
    assert s.get("x", (2, 3), np.float32) is a and s.get("x", (2, 3), np.float64) is not a
    made = []
    c = s.get("c", (2,), np.float64, lambda xp, shape, dt: made.append(1) or xp.full(shape, 7.0, dt))
    assert s.get("c", (2,), np.float64) is c and made == [1] and c.tolist() == [7.0, 7.0]
    for k in range(5):
        s.get(k, (1,), np.float64)
    assert len(s) <= 4


def test_limit_threads_sets_and_restores():
    ctl = blas.openblas_threads()
    if ctl is None:
        pytest.skip("no OpenBLAS thread control found in this NumPy build")
    before = ctl[0]()
    lim = blas.limit_threads(1)
    assert ctl[0]() == 1
    lim.restore()
    assert ctl[0]() == before


def test_every_backend_class_installs_its_devices_ops():
    be = resolve("numpy")
    for name, fn in ops.implementations("numpy").items():
        assert getattr(type(be), name) is fn and be.implements(name)
    assert not be.implements("clip_by_global_norm")         # NumPy clips by per-array sums
