"""pytest-benchmark suite over a small grid, for regression tracking (separate from tests/).

    pytest benchmarks/                                   # all, NumPy (+ CuPy where usable)
    pytest benchmarks/ --benchmark-autosave              # keep the run under .benchmarks/
    pytest benchmarks/ --benchmark-compare               # compare with the last saved run

Each cell is checked against torch.nn.LSTM (or the reference cell without torch) before it
is timed; the timed calls end with the device synchronised. Groups are per cell, so the
table pytest-benchmark prints puts xlstm, its GEMM floor and torch side by side.
"""
import pytest

import xlstm
from xlstm.backends import cupy_unavailable_reason
from xlstm.bench import Cell, CellRunner

pytest.importorskip("pytest_benchmark")

GRID = [(H, T) for H in (64, 256) for T in (16, 64)]
B = 32

try:
    import torch
except Exception:  # torch is optional: the torch benchmarks skip
    torch = None

_runners = {}


def runner(backend, H, T, layers=1):
    """One checked CellRunner per (backend, cell), reused by every benchmark of that cell."""
    key = (backend, H, T, layers)
    if key not in _runners:
        if backend == "cupy":
            reason = cupy_unavailable_reason()
            if reason:
                pytest.skip(f"needs a usable CUDA GPU: {reason}")
        r = CellRunner(Cell(H, T, B, layers), xlstm.backends.resolve(backend), "float32", torch)
        r.check()
        _runners[key] = r
    return _runners[key]


def _bench(benchmark, fn, group):
    benchmark.group = group
    benchmark.pedantic(fn, warmup_rounds=2, rounds=10 if fn.__self__.cell.H <= 64 else 5, iterations=1)


@pytest.mark.parametrize("H,T", GRID)
@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_xlstm_step(benchmark, backend, H, T):
    r = runner(backend, H, T)
    _bench(benchmark, r.xlstm_step, f"{backend} step H={H} T={T}")


@pytest.mark.parametrize("H,T", GRID)
@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_xlstm_forward(benchmark, backend, H, T):
    r = runner(backend, H, T)
    _bench(benchmark, r.xlstm_fwd, f"{backend} forward H={H} T={T}")


@pytest.mark.parametrize("H,T", GRID)
@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_gemm_floor_step(benchmark, backend, H, T):
    r = runner(backend, H, T)
    _bench(benchmark, r.floor_step, f"{backend} step H={H} T={T}")


@pytest.mark.parametrize("H,T", GRID)
@pytest.mark.parametrize("backend", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_torch_step(benchmark, backend, H, T):
    if torch is None:
        pytest.skip("torch is not installed")
    r = runner(backend, H, T)
    if r.torch is None:
        pytest.skip("torch cannot run on this device")
    _bench(benchmark, r.torch_step, f"{backend} step H={H} T={T}")


@pytest.mark.parametrize("H,T", [(64, 16)])
def test_xlstm_step_two_layers(benchmark, H, T):
    r = runner("numpy", H, T, layers=2)
    _bench(benchmark, r.xlstm_step, f"numpy step 2 layers H={H} T={T}")
