"""The persistent kernels' block/step schedule, run on the host, against the NumPy backend.

``tests/support/kernels_host_shim.cpp`` runs the phase functions of ``xlstm/kernels/lstm_persistent.cuh``
(the very code the persistent kernels call) in the kernel's schedule: per step, every block
runs its partial products and then its pointwise phase, with a block order and a thread order
that alternate between steps (so a phase reading what another block or thread writes in the
same phase would show). Shared memory is a per-block buffer poisoned with NaN.

The results must equal the NumPy backend's per-step loop (forward: ``gates[t] += h @ U`` and
``lstm_forward_step``; backward: ``lstm_backward_sequence``) for several (B, H, NB, threads),
including H not divisible by NB, more units than threads, one block, one unit per block,
masks, zoneout (Bernoulli and expected) and recurrent dropout: float64 to 1e-12, float32 to
1e-6, normwise max|a-b| / max(max|b|, 1). And a launch must be bitwise repeatable.
"""
from __future__ import annotations

import numpy as np
import pytest

from support.kernels_host import SUFFIX as SFX, check
from support.kernels_host import ptr as _p
from xlstm.backends.numpy_backend import NumpyBackend


@pytest.fixture(scope="module")
def lib(host_lib):
    return host_lib


def launch_shape(lib, backward, B, H, NB, nt, KS, dt):
    return int(lib.host_persistent_smem_elems(int(backward), B, H, NB, KS)) * np.dtype(dt).itemsize


def emulate_forward(lib, gates_in, hs0, cs0, U, fb, mods, NB, nt, KS):
    """The persistent forward on the host. Returns (gates, hs, cs)."""
    dt = gates_in.dtype.type
    T, B, H4 = gates_in.shape
    H = H4 // 4
    gates = gates_in.copy()
    hs = np.full((T + 1, B, H), np.nan, dt)
    cs = np.full((T + 1, B, H), np.nan, dt)
    hs[0], cs[0] = hs0, cs0
    barrier = np.zeros(1, np.uint32)
    getattr(lib, f"host_lstm_persistent_forward_{SFX[dt]}")(
        _p(gates), _p(hs), _p(cs), _p(U), dt(fb), *map(_p, mods), _p(barrier), T, B, H, KS,
        NB, nt, launch_shape(lib, False, B, H, NB, nt, KS, dt))
    return gates, hs, cs


def emulate_backward(lib, gates, cs, dy, dh_n, dc_n, UT, mods, NB, nt, KS):
    """The persistent backward on the host. Returns (dz, dh0, dc0)."""
    dt = gates.dtype.type
    T, B, H4 = gates.shape
    H = H4 // 4
    dz = np.full_like(gates, np.nan)
    dh, dc = dh_n.copy(), dc_n.copy()
    barrier = np.zeros(1, np.uint32)
    getattr(lib, f"host_lstm_persistent_backward_{SFX[dt]}")(
        _p(gates), _p(cs), _p(dy), _p(dh), _p(dc), _p(dz), _p(UT), *map(_p, mods), _p(barrier),
        T, B, H, KS, NB, nt, launch_shape(lib, True, B, H, NB, nt, KS, dt))
    return dz, dh, dc


def numpy_forward(gates_in, hs0, cs0, U, fb, mods):
    """The layer's per-step loop on the NumPy backend (the reference)."""
    be = NumpyBackend()
    T, B, H4 = gates_in.shape
    H = H4 // 4
    gates = gates_in.copy()
    hs = np.empty((T + 1, B, H), gates.dtype)
    cs = np.empty_like(hs)
    hs[0], cs[0] = hs0, cs0
    mask, zc, zh, gm = mods
    for t in range(T):
        gates[t] += hs[t] @ U
        be.lstm_forward_step(gates[t], cs[t], hs[t], cs[t + 1], hs[t + 1], fb,
                             *(None if m is None else m[t] for m in (mask, zc, zh, gm)))
    return gates, hs, cs


MODS = ["plain", "mask", "zoneout_train", "zoneout_eval", "dropout", "all"]


def make_case(rng, T, B, H, dt, kind):
    gates_in = (rng.standard_normal((T, B, 4 * H)) * 1.5).astype(dt)
    U = (rng.standard_normal((H, 4 * H)) / np.sqrt(H)).astype(dt)
    hs0 = rng.uniform(-1, 1, (B, H)).astype(dt)
    cs0 = rng.standard_normal((B, H)).astype(dt)
    mask = zc = zh = gm = None
    if kind in ("mask", "all"):
        lengths = rng.integers(0, T + 1, B)
        lengths[-1] = T
        mask = (np.arange(T)[:, None] < lengths[None, :]).astype(dt)
    if kind in ("zoneout_train", "all"):
        zc = (rng.random((T, B, H)) < 0.3).astype(dt)
        zh = (rng.random((T, B, H)) < 0.3).astype(dt)
    if kind == "zoneout_eval":
        zc = np.full((T, B, H), 0.3, dt)
        zh = np.full((T, B, H), 0.15, dt)
    if kind in ("dropout", "all"):
        gm = ((rng.random((T, B, H)) < 0.75) / 0.75).astype(dt)
    return gates_in, U, hs0, cs0, (mask, zc, zh, gm)


# (T, B, H, NB, nt, KS): H % NB != 0; one block; one unit per block; units > threads; KS > H
GEOMS = [(5, 3, 7, 3, 32, 4), (4, 2, 16, 16, 64, 8), (3, 4, 33, 1, 64, 2), (6, 5, 12, 5, 8, 1),
         (2, 1, 3, 2, 32, 32), (4, 3, 40, 7, 256, 16)]


def _id(g):
    return "T{}B{}H{}-NB{}-nt{}-KS{}".format(*g)


@pytest.mark.parametrize("dt", [np.float64, np.float32])
@pytest.mark.parametrize("kind", MODS)
@pytest.mark.parametrize("geom", GEOMS, ids=[_id(g) for g in GEOMS])
def test_persistent_schedule_matches_numpy(lib, dt, kind, geom):
    T, B, H, NB, nt, KS = geom
    rng = np.random.default_rng([T, B, H, NB, MODS.index(kind), np.dtype(dt).itemsize])
    gates_in, U, hs0, cs0, mods = make_case(rng, T, B, H, dt, kind)
    fb = 1.0

    gates, hs, cs = emulate_forward(lib, gates_in, hs0, cs0, U, fb, mods, NB, nt, KS)
    gn, hn, cn = numpy_forward(gates_in, hs0, cs0, U, fb, mods)
    check("forward gates", dt, gates, gn)
    check("forward hs", dt, hs, hn)
    check("forward cs", dt, cs, cn)

    # backward from the reference forward's stored values (both sides see the same inputs)
    dy = rng.standard_normal((T, B, H)).astype(dt)
    dh_n, dc_n = (rng.standard_normal((B, H)).astype(dt) for _ in range(2))
    UT = np.ascontiguousarray(U.T)
    dz, dh0, dc0 = emulate_backward(lib, gn, cn, dy, dh_n, dc_n, UT, mods, NB, nt, KS)
    dzn = np.empty_like(gn)
    dhr, dcr = dh_n.copy(), dc_n.copy()
    NumpyBackend().lstm_backward_sequence(gn, cn, dy, dhr, dcr, dzn, UT, *mods)
    check("backward dz", dt, dz, dzn)
    check("backward dh0", dt, dh0, dhr)
    check("backward dc0", dt, dc0, dcr)

    # the same launch again gives bitwise the same results (fixed summation order, no atomics)
    again = emulate_forward(lib, gates_in, hs0, cs0, U, fb, mods, NB, nt, KS)
    assert all(np.array_equal(a, b) for a, b in zip(again, (gates, hs, cs)))
    again = emulate_backward(lib, gn, cn, dy, dh_n, dc_n, UT, mods, NB, nt, KS)
    assert all(np.array_equal(a, b) for a, b in zip(again, (dz, dh0, dc0)))


@pytest.mark.parametrize("dt", [np.float64, np.float32])
def test_partition_does_not_change_the_result_beyond_rounding(lib, dt):
    """Different grids and K-splits agree to rounding, and each one is what NumPy computes."""
    rng = np.random.default_rng(9)
    gates_in, U, hs0, cs0, mods = make_case(rng, 4, 3, 20, dt, "all")
    ref = numpy_forward(gates_in, hs0, cs0, U, 0.5, mods)[1]
    for NB, nt, KS in [(1, 1, 1), (20, 32, 1), (6, 96, 32), (3, 7, 3)]:
        hs = emulate_forward(lib, gates_in, hs0, cs0, U, 0.5, mods, NB, nt, KS)[1]
        check(f"forward hs NB={NB} nt={nt} KS={KS}", dt, hs, ref)


def test_bad_launch_is_visible(lib):
    """Too little shared memory or a barrier counter that is not zeroed poison the output."""
    rng = np.random.default_rng(2)
    gates_in, U, hs0, cs0, mods = make_case(rng, 2, 2, 6, np.float64, "plain")
    T, B, H = 2, 2, 6
    for smem, bar in [(launch_shape(lib, False, B, H, 2, 32, 2, np.float64) - 8, 0),
                      (launch_shape(lib, False, B, H, 2, 32, 2, np.float64), 1)]:
        gates = gates_in.copy()
        hs = np.zeros((T + 1, B, H))
        cs = np.zeros((T + 1, B, H))
        barrier = np.array([bar], np.uint32)
        lib.host_lstm_persistent_forward_f64(_p(gates), _p(hs), _p(cs), _p(U), 1.0, None, None,
                                             None, None, _p(barrier), T, B, H, 2, 2, 32, smem)
        assert np.isnan(gates).all()


def test_smem_formula():
    """The shared-memory size of one block, written out: U's slice plus the partial sums."""
    from xlstm.backends.persistent import smem_bytes

    # H=64 over 64 blocks: one unit; forward 4 columns of 65, part B*1*4*KS
    assert smem_bytes(False, B=16, H=64, NB=64, KS=8, itemsize=4) == (4 * 65 + 16 * 4 * 8) * 4
    # backward: one row of 4H+1, part B*1*KS
    assert smem_bytes(True, B=16, H=64, NB=64, KS=8, itemsize=8) == (257 + 16 * 8) * 8
    # H=1000 over 128 blocks: 8 units at most
    assert smem_bytes(False, B=64, H=1000, NB=128, KS=1, itemsize=4) == (32 * 1001 + 64 * 8 * 4) * 4


@pytest.mark.parametrize("backward", [False, True])
def test_smem_formula_matches_the_kernel_header(lib, backward):
    from xlstm.backends.persistent import smem_bytes

    for B, H, NB, KS in [(1, 1, 1, 1), (3, 7, 3, 4), (64, 1024, 128, 1), (16, 65, 64, 8)]:
        want = int(lib.host_persistent_smem_elems(int(backward), B, H, NB, KS)) * 4
        assert smem_bytes(backward, B=B, H=H, NB=NB, KS=KS, itemsize=4) == want


def test_row_block_matches_the_kernel_header():
    """The plan sizes the K-split by the header's rows per work item."""
    import re

    from xlstm.backends.persistent import ROW_BLOCK
    from xlstm.kernels import KERNELS_DIR

    text = (KERNELS_DIR / "lstm_persistent.cuh").read_text()
    assert int(re.search(r"#define PERSIST_RB (\d+)", text).group(1)) == ROW_BLOCK
