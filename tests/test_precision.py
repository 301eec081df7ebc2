"""Precision modes (xlstm/precision.py): rounding, validation, the GEMMs, error bounds vs float64.

The rounding is checked against independent implementations (ml_dtypes for bf16, float64
arithmetic for TF32); the emulated products against NumPy products of ml_dtypes-rounded
operands; the CuPy path's cublasGemmEx calls against a stand-in of nvmath's gemm_ex that reads the
very pointers, leading dimensions and flags (column-major), so its layout logic is proven
without a GPU; whole models against float64 within bounds derived below.
"""
from __future__ import annotations

import ctypes
import warnings

import ml_dtypes
import numpy as np
import pytest

import xlstm
from xlstm import precision as P
from xlstm import precision_error as PE
from xlstm.backends import resolve
from xlstm.ops import gemm
from xlstm.errors import InputError
from xlstm.precision import PrecisionEmulationWarning, Rounded

pytestmark = pytest.mark.filterwarnings("ignore::xlstm.precision.PrecisionEmulationWarning")


def random_bits(n, seed=0):
    """float32 values from uniformly random bit patterns: every exponent, subnormals, Inf, NaN."""
    u = np.random.default_rng(seed).integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    specials = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFFFFFFF, 0x7F7FFFFF,
                         0x00000001, 0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7F8000], np.uint32)
    return np.concatenate([specials, u]).view(np.float32)


def same_bits_or_both_nan(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


# =============================================================================================
# 1. Rounding against independent implementations
# =============================================================================================
def test_round_bf16_equals_ml_dtypes():
    x = random_bits(400_000)
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    got = P.round_bf16(x)
    bad = ~same_bits_or_both_nan(got, want)
    assert not bad.any(), f"{bad.sum()} differ, e.g. {x[bad][:3].view(np.uint32)}"
    # ties go to even: 1 + 2^-8 is half-way between 1 and 1 + 2^-7
    assert P.round_bf16(np.float32([1 + 2 ** -8, 1 + 3 * 2 ** -8])).tolist() == [1.0, 1 + 2 ** -6]


def test_round_bf16_keeps_nan_sign_and_overflows_to_inf():
    x = np.array([np.nan, -np.nan, 3.4e38, -3.4e38, np.inf], np.float32)
    r = P.round_bf16(x)
    assert np.isnan(r[:2]).all() and np.signbit(r[1]) and not np.signbit(r[0])
    assert r[2] == np.inf and r[3] == -np.inf and r[4] == np.inf


def _tf32_reference(x, mode):
    """TF32 rounding in float64 arithmetic: the multiple of 2^(e-10) nearest to x (np.round: ties
    to even) or toward zero, e the exponent of x (floored at float32's smallest normal)."""
    x64 = x.astype(np.float64)
    fin = np.isfinite(x64) & (x64 != 0)
    e = np.floor(np.log2(np.abs(x64[fin])))
    e = np.maximum(e, -126)
    ulp = np.exp2(e - 10)
    q = x64[fin] / ulp
    q = np.round(q) if mode == "rne" else np.trunc(q)
    out = x64.copy()
    out[fin] = q * ulp
    return out.astype(np.float32)        # values past float32's range become Inf here too


@pytest.mark.parametrize("mode", ["rne", "rz"])
def test_round_tf32_equals_float64_rounding(mode):
    x = random_bits(200_000, seed=1)
    with np.errstate(over="ignore", invalid="ignore"):
        want = _tf32_reference(x, mode)
    got = P.round_tf32(x, mode)
    bad = ~same_bits_or_both_nan(got, want)
    assert not bad.any(), f"{bad.sum()} differ, e.g. {x[bad][:3]} -> {got[bad][:3]} vs {want[bad][:3]}"
    assert (got.view(np.uint32)[np.isfinite(got)] & 0x1FFF == 0).all()      # 10 stored bits left


def test_rounding_refuses_float64():
    with pytest.raises(InputError, match="float32"):
        P.round_bf16(np.zeros(3))


def test_cast_kernel_host_build_equals_ml_dtypes(host_lib):
    """f32_to_bf16 (xlstm/kernels/precision.cuh, the code the GPU runs) compiled for the host."""
    x = random_bits(300_000, seed=2)
    y = np.empty(x.shape, np.uint16)
    host_lib.host_f32_to_bf16(x.ctypes.data, y.ctypes.data, ctypes.c_longlong(x.size))
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    nan = np.isnan(x)
    assert (y[~nan] == want[~nan]).all()
    exp_all_ones = (y[nan] & 0x7F80) == 0x7F80
    assert exp_all_ones.all() and ((y[nan] & 0x7F) != 0).all()      # NaN stays NaN
    assert ((y[nan] >> 15) == (x[nan].view(np.uint32) >> 31)).all()  # with its sign


# =============================================================================================
# 2. Validation and plumbing
# =============================================================================================
def test_reduced_precision_needs_float32():
    for mode in ("tf32", "bf16"):
        with pytest.raises(InputError, match="float32 model"):
            xlstm.LSTM(3, 4, dtype="float64", precision=mode)
        with pytest.raises(InputError, match="float32 model"):
            xlstm.Dense(3, 4, dtype="float64", precision=mode)
    m = xlstm.LSTM(3, 4, dtype="float64")
    with pytest.raises(InputError, match="float32 model"):
        m.precision = "bf16"
    assert m.precision == "float32"


def test_unknown_precision_is_named():
    with pytest.raises(InputError, match="precision must be one of"):
        xlstm.LSTM(3, 4, precision="fp16")
    assert xlstm.LSTM(3, 4, precision="BF16").precision == "bf16"


def test_sequential_precision_sets_every_child():
    seq = xlstm.Sequential(xlstm.Embedding(5, 3), xlstm.LSTM(3, 4), xlstm.Dense(4, 5))
    assert seq.precision == "float32"
    seq.precision = "tf32"
    assert [m.precision for m in seq] == ["float32", "tf32", "tf32"] and seq.precision == "tf32"
    seq[2].precision = "bf16"
    assert seq.precision == "mixed"
    # an Embedding does no matrix product: it neither counts as 'mixed' nor takes the mode
    seq = xlstm.Sequential(xlstm.Embedding(5, 3), xlstm.LSTM(3, 4, precision="bf16"),
                           xlstm.Dense(4, 5, precision="bf16"))
    assert seq.precision == "bf16"
    seq64 = xlstm.Sequential(xlstm.LSTM(3, 4, dtype="float64"))
    with pytest.raises(InputError, match="float32 model"):
        seq64.precision = "bf16"


def test_trace_refuses_reduced_precision():
    m = xlstm.LSTM(3, 4, seed=0, precision="bf16")
    x = np.ones((2, 1, 3), np.float32)
    with pytest.raises(InputError, match="precision='float32'"):
        m.forward(x, trace=True)


def test_numpy_emulation_warns_once(monkeypatch):
    monkeypatch.setattr(gemm, "_WARNED", set())
    m = xlstm.LSTM(3, 4, seed=0, precision="bf16", backend="numpy")
    x = np.ones((2, 1, 3), np.float32)
    with pytest.warns(PrecisionEmulationWarning, match="EMULATION.*SLOWER"):
        m.forward(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.forward(x)


# =============================================================================================
# 3. The emulated GEMMs (NumPy backend)
# =============================================================================================
def _ml_round(a, mode):
    """Operand rounding by an independent implementation (ml_dtypes for bf16)."""
    if mode == "bf16":
        return a.astype(ml_dtypes.bfloat16).astype(np.float32)
    return _tf32_reference(a, "rne")


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_numpy_matmul_is_float32_product_of_rounded_operands(mode):
    rng = np.random.default_rng(3)
    be = resolve("numpy")
    a = rng.standard_normal((7, 33)).astype(np.float32)
    b = rng.standard_normal((33, 20)).astype(np.float32)
    want = np.matmul(_ml_round(a, mode), _ml_round(b, mode))
    assert np.array_equal(be.matmul(a, b, precision=mode), want)
    out = np.ones((7, 20), np.float32)
    be.matmul_add(a, b, out, mode)
    assert np.array_equal(out, 1 + want)
    # a weight rounded once (gemm_operand), also as a transposed view, gives the same products
    Br = be.gemm_operand(b, mode)
    assert isinstance(Br, Rounded) and Br.shape == b.shape
    assert np.array_equal(be.matmul(a, Br, precision=mode), want)
    bt = np.ascontiguousarray(b.T)
    np.testing.assert_allclose(be.matmul(a, be.gemm_operand(bt.T, mode), precision=mode), want, rtol=1e-6)
    # and it differs from the float32 product by the rounding, not more
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(a).astype(np.float64) @ np.abs(b)
    err = np.abs(want - exact) / scale
    assert err.max() <= 2 * P.UNIT_ROUNDOFF[mode] + 33 * 2.0 ** -24
    assert err.max() > 0.1 * P.UNIT_ROUNDOFF[mode]


def test_float32_mode_is_the_exact_path():
    """precision='float32' changes nothing: bitwise the default model's outputs and gradients."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3, 5)).astype(np.float32)
    outs = []
    for kw in ({}, {"precision": "float32"}):
        m = xlstm.LSTM(5, 7, num_layers=2, seed=0, **kw)
        y, _ = m.forward(x)
        dx, _ = m.backward(np.ones_like(y))
        outs.append([y, dx] + [m.grads[k] for k in sorted(m.grads)])
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_dense_products_use_rounded_operands(mode):
    rng = np.random.default_rng(5)
    d = xlstm.Dense(6, 4, seed=0, precision=mode)
    x = rng.standard_normal((3, 2, 6)).astype(np.float32)
    dy = rng.standard_normal((3, 2, 4)).astype(np.float32)
    W, b = d.params["W"], d.params["b"]
    y = d.forward(x)
    np.testing.assert_allclose(y, (_ml_round(x.reshape(6, 6), mode) @ _ml_round(W, mode)).reshape(3, 2, 4) + b,
                               rtol=1e-6, atol=1e-7)
    dx = d.backward(dy)
    np.testing.assert_allclose(d.grads["W"], _ml_round(x.reshape(6, 6), mode).T @ _ml_round(dy.reshape(6, 4), mode),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, (_ml_round(dy.reshape(6, 4), mode) @ _ml_round(W, mode).T).reshape(x.shape),
                               rtol=1e-6, atol=1e-7)


# =============================================================================================
# 4. Whole-model error against float64 (the README's table)
# =============================================================================================
# How the bounds are derived. One product with rounded operands errs by at most (2u + u^2) of
# sum |a_k b_k| (xlstm/precision.py); the measured model error is proportional to u: on the plain
# cell tf32 and bf16 give the same error/u (0.87 and 0.90 at the README's model, 2 layers, H=128,
# T=50, B=16), i.e. the recurrence neither amplifies nor averages the per-product error much. The
# bound is that ratio with a 25% margin: 1.15 u, still under the single-product worst case 2u.
# The LayerNorm cell (eps 1e-12) divides by each row's standard deviation, which amplifies
# operand errors: measured 11.2 u (tf32) and 21.4 u (bf16, growing faster than u), bounds 14 u
# and 27 u. Truncating TF32 (which a GPU may do, see precision.py) biases every product the same
# way: measured 4.45 u on the plain cell (about twice rounding's 2u worst case, compounded), bound
# 5.6 u; LayerNorm 11.2 u, bound 14 u. float32 stays the exact path's few ulps.
BOUNDS = {  # (layer_norm, precision, tf32 rounding) -> max over outputs of error / u
    (False, "tf32", "rne"): 1.15, (False, "bf16", "rne"): 1.15, (False, "tf32", "rz"): 5.6,
    (True, "tf32", "rne"): 14.0, (True, "bf16", "rne"): 27.0, (True, "tf32", "rz"): 14.0,
}


@pytest.mark.parametrize("layer_norm,mode,rounding", list(BOUNDS), ids=[f"{'ln' if k[0] else 'plain'}-{k[1]}-{k[2]}"
                                                                      for k in BOUNDS])
def test_model_error_against_float64_is_bounded(layer_norm, mode, rounding):
    err = PE.error_against_float64(mode, layer_norm=layer_norm, tf32_rounding=rounding)
    u = P.UNIT_ROUNDOFF[mode]
    worst = max(err, key=err.get)
    assert err[worst] <= BOUNDS[(layer_norm, mode, rounding)] * u, \
        f"{worst}: relative error {err[worst]:.3g} = {err[worst] / u:.2f} u > {BOUNDS[(layer_norm, mode, rounding)]} u"
    # the rounding is really there: every output is off by a sizeable fraction of u
    assert min(err.values()) > 0.1 * u
    assert {"y", "h_n", "c_n", "dx", "dh0", "dc0", "dl0.W", "dl0.U", "dl1.W", "dl1.U"} <= set(err)


def test_plain_cell_error_scales_with_u():
    """tf32/bf16 errors differ by the ratio of their unit roundoffs (2^3): the error comes from
    the operand rounding (the model of the derivation above), not from something else."""
    e_tf = PE.error_against_float64("tf32")
    e_bf = PE.error_against_float64("bf16")
    ratio = {k: e_bf[k] / e_tf[k] for k in e_tf}
    assert all(4 < r < 16 for r in ratio.values()), ratio


def test_bidirectional_masked_model_is_bounded():
    """Lengths and the reverse direction take the per-step (base class) BPTT with rounded U^T."""
    err = PE.error_against_float64("bf16", bidirectional=True, num_layers=1, T=30)
    assert max(err.values()) <= 1.15 * P.UNIT_ROUNDOFF["bf16"]


def test_bf16_model_equals_an_independent_torch_implementation():
    """The bf16 mode's definition (which operands are rounded, in forward and BPTT) against a
    torch LSTM written here: every product through a torch.autograd.Function that rounds its
    operands with torch's own bfloat16 conversion and sums in float32, backward likewise
    (grad_a = r(g) r(b)^T, grad_b = r(a)^T r(g)). At this size rounding boundaries are rarely
    crossed by summation-order noise, so the two agree to float32 noise (measured 1e-7); an
    operand left unrounded, or rounded where it should not be, shows at ~1e-3."""
    torch = pytest.importorskip("torch")

    class RoundedMatmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ra, rb = a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()
            ctx.save_for_backward(ra, rb)
            return ra @ rb

        @staticmethod
        def backward(ctx, g):
            ra, rb = ctx.saved_tensors
            rg = g.to(torch.bfloat16).float()
            return rg @ rb.T, ra.T @ rg

    D, H, L, T, B, fb = 8, 16, 2, 3, 4, 1.0
    m = xlstm.LSTM(D, H, num_layers=L, seed=0, precision="bf16", forget_bias=fb, backend="numpy")
    rng = np.random.default_rng(10)
    x = rng.standard_normal((T, B, D)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    y, _ = m.forward(x)
    dx, _ = m.backward(dy)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in m.params.items()}
    tx = torch.tensor(x, requires_grad=True)
    mm, inp = RoundedMatmul.apply, tx
    for k in range(L):
        Z = mm(inp.reshape(T * B, -1), tp[f"l{k}.W"]).reshape(T, B, 4 * H) + tp[f"l{k}.b"]
        h, c, ys = torch.zeros(B, H), torch.zeros(B, H), []
        for t in range(T):
            i, f, g, o = (Z[t] + mm(h, tp[f"l{k}.U"])).split(H, 1)
            c = torch.sigmoid(f + fb) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            ys.append(h)
        inp = torch.stack(ys)
    inp.backward(torch.tensor(dy))
    pairs = {"y": (y, inp.detach().numpy()), "dx": (dx, tx.grad.numpy()),
             **{k: (m.grads[k], tp[k].grad.numpy()) for k in tp}}
    for k, (a, b) in pairs.items():
        d = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert d <= 1e-5, f"{k}: {d:.2e} from the torch implementation"


# =============================================================================================
# 5. The CuPy path's cublasGemmEx calls, against a stand-in of nvmath's cuBLAS binding whose
#    gemm_ex computes the column-major contract on the raw pointers (tests/support/standin.py)
# =============================================================================================
@pytest.fixture
def host_cupy(host_lib, monkeypatch):
    """CupyBackend on a stand-in cupy (NumPy arrays, host kernels) and stand-in nvmath cuBLAS,
    CUDA graphs off (the eager loop; the graph tests are below)."""
    from support import standin as tcb
    from xlstm.backends.cupy_backend import CupyBackend

    fake = tcb.install_fakes(host_lib, monkeypatch, nvmath=True)
    be = CupyBackend()
    be.cuda_graphs = False
    return be, fake, fake.gemm_ex_calls


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_cupy_gemmex_layouts_match_numpy_emulation(host_cupy, mode):
    be, fake, calls = host_cupy
    ref = resolve("numpy")
    rng = np.random.default_rng(6)
    dev = fake.module.asarray
    a = dev(rng.standard_normal((5, 12)).astype(np.float32))
    b = dev(rng.standard_normal((12, 9)).astype(np.float32))
    at = dev(np.ascontiguousarray(a.T)).T            # F-contiguous: a transposed view
    bt = dev(np.ascontiguousarray(b.T)).T
    want = ref.matmul(np.asarray(a), np.asarray(b), precision=mode)
    for A in (a, at):
        for Bm in (b, bt, be.gemm_operand(b, mode), be.gemm_operand(bt, mode)):
            np.testing.assert_allclose(be.matmul(A, Bm, precision=mode), want, rtol=2e-6, atol=1e-6)
    out = dev(np.ones((5, 9), np.float32))
    be.matmul_add(at, bt, out, mode)
    np.testing.assert_allclose(out, 1 + want, rtol=2e-6, atol=1e-6)
    wide = dev(np.ones((5, 18), np.float32))         # a non-contiguous output (every other column)
    be.matmul_add(a, b, wide[:, ::2], mode)
    np.testing.assert_allclose(wide[:, ::2], 1 + want, rtol=2e-6, atol=1e-6)
    assert (wide[:, 1::2] == 1).all()
    t = 14 if mode == "bf16" else 0                  # CUDA_R_16BF, CUDA_R_32F (library_types.h)
    assert calls and all(c["Atype"] == t for c in calls)
    assert all(c["stream"] == fake.current.ptr for c in calls)   # each call on the current stream
    if mode == "bf16":      # operands cast by the kernel, weights once
        assert "f32_to_bf16" in fake.launches


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_cupy_model_matches_numpy_emulation(host_cupy, mode, layer_norm):
    """A whole LSTM + Dense, forward and backward, on the CuPy backend's launches and gemmEx calls
    (host stand-ins) against the NumPy emulation. Same operand rounding; only the summation
    order differs (float64 in the stand-in), plus the rare operand that lands on the other side
    of a rounding boundary because of it: 1e-4 normwise, against ~1e-3-1e-2 of the mode's error."""
    be, fake, calls = host_cupy
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 3, 6)).astype(np.float32)
    res = []
    for backend in (resolve("numpy"), be):
        m = xlstm.Sequential(xlstm.LSTM(6, 16, num_layers=2, layer_norm=layer_norm, seed=0, backend=backend),
                             xlstm.Dense(16, 4, seed=1, backend=backend))
        m.precision = mode
        y = m.forward(x)
        m.backward(np.asarray(y) * 0 + 1)
        res.append({"y": np.asarray(y), **{k: np.asarray(v) for k, v in m.grads.items()}})
    for k in res[0]:
        d = np.linalg.norm(res[1][k] - res[0][k]) / np.linalg.norm(res[0][k])
        assert d <= 1e-4, f"{k}: {d:.2e}"
    assert len(calls) > 0


# =============================================================================================
# 6. On a GPU
# =============================================================================================
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_gpu_model_error_is_bounded(mode):
    """cuBLAS tf32/bf16 on the device within the CPU bounds (tf32: the truncation bound, since
    NVIDIA does not document the TF32 conversion's rounding)."""
    for ln in (False, True):
        err = PE.error_against_float64(mode, layer_norm=ln, backend="cupy")
        bound = BOUNDS[(ln, mode, "rz" if mode == "tf32" else "rne")]
        assert max(err.values()) <= bound * P.UNIT_ROUNDOFF[mode], err


@pytest.mark.gpu
def test_gpu_bf16_matches_numpy_emulation():
    """The device's bf16 GEMMs round exactly as the emulation (same kernel bits), so a model
    differs only by summation order: 1e-4 normwise (see the host stand-in test)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((20, 8, 32)).astype(np.float32)
    res = []
    for backend in ("numpy", "cupy"):
        m = xlstm.LSTM(32, 128, num_layers=2, seed=0, backend=backend, precision="bf16")
        y, _ = m.forward(x)
        m.backward(y * 0 + 1)
        be = m.backend
        res.append({"y": be.to_numpy(y), **{k: be.to_numpy(v) for k, v in m.grads.items()}})
    for k in res[0]:
        d = np.linalg.norm(res[1][k] - res[0][k]) / np.linalg.norm(res[0][k])
        assert d <= 1e-4, f"{k}: {d:.2e}"


@pytest.mark.gpu
def test_gpu_tf32_rounding():
    """Which rounding cuBLAS's TF32 path applies: A @ I returns A's operands rounded, exactly.
    Reports the mode; fails only if it is none of nearest-even, truncation, nearest-away.

    512 x 512 x 512: cuBLAS's heuristics may send a small product (64^3) to a SIMT kernel that
    computes in full float32 even with TF32 allowed, which would match no rounding mode; sizes
    in multiples of 256 go to its tensor-core kernels, where TF32 rounding happens."""
    be = resolve("cupy")
    rng = np.random.default_rng(9)
    n = 512
    a = rng.standard_normal((n, n)).astype(np.float32)
    got = be.to_numpy(be.matmul(be.asarray(a), be.asarray(np.eye(n, dtype=np.float32)), precision="tf32"))
    u = a.view(np.uint32)
    rna = ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    modes = {"rne": P.round_tf32(a, "rne"), "rz": P.round_tf32(a, "rz"), "rna": rna}
    match = [k for k, v in modes.items() if np.array_equal(got, v)]
    print(f"cuBLAS TF32 operand rounding on this GPU: {match or 'unknown'}")
    assert match, "cuBLAS's TF32 result is none of the known roundings"


# =============================================================================================
# 7. `xlstm train --precision`: checkpoint, resume, sample, export in every mode (NumPy emulation)
# =============================================================================================
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_train_precision_resume_equals_uninterrupted(mode, tmp_path):
    from support import cli as tt
    from xlstm.app import checkpoint

    corpus = tmp_path / "c.txt"
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(["def", "x", "return", "self", "if"], 6)) for _ in range(80)))
    opts = ["--text", corpus, *tt.TINY, "--steps", "12", "--save-every", "4", "--precision", mode]
    a, b = tmp_path / "a", tmp_path / "b"
    r = tt.xlstm("train", *opts, "--out", a, check=0)
    assert f"precision {mode}" in r.stdout and "EMULATED" in r.stdout
    assert "PrecisionEmulationWarning" not in r.stderr      # the header says it; no raw warning in the bar
    tt.xlstm("train", *opts, "--out", b, "--stop-after", "5", check=130)
    tt.xlstm("train", "--resume", b, "--no-progress", check=0)
    assert [x["loss"] for x in tt.records(a)] == [x["loss"] for x in tt.records(b)]
    meta = checkpoint.load(str(b / "ckpt-000012"))[1]
    assert meta["config"]["precision"] == mode
    # the emulation really changes the numbers: a float32 run differs
    f32 = tmp_path / "f32"
    tt.xlstm("train", *opts[:-2], "--out", f32, check=0)
    assert [x["loss"] for x in tt.records(f32)] != [x["loss"] for x in tt.records(a)]
    # resuming in another mode is refused, naming both
    r = tt.xlstm("train", "--resume", b, "--precision", "float32", "--steps", "20", "--no-progress", check=2)
    assert f"--precision {mode!r}" in r.stderr and "--precision 'float32'" in r.stderr
    from xlstm.app.checkpoint import load_model
    model, *_ = load_model(str(b), backend="numpy")
    assert model.precision == mode
    tt.xlstm("sample", b, "--length", "5", "--seed", "0", check=0)
    if importlib_util_find("torch"):
        tt.xlstm("export", b, "--to", "torch", "--output", tmp_path / "l.pt", check=0)


def importlib_util_find(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_train_refuses_float64_with_reduced_precision(tmp_path):
    from support import cli as tt

    r = tt.xlstm("train", "--text", __file__, *tt.TINY, "--steps", "1", "--dtype", "float64",
                 "--precision", "bf16", "--out", tmp_path / "r", check=2)
    assert "--precision bf16" in r.stderr and "--dtype float32" in r.stderr


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_bench_precision_rows(mode, tmp_path, capsys):
    """`xlstm bench --precision`: checked against torch in the same setting, then timed; rows say
    the mode. float64 with a reduced mode is refused."""
    import json

    from xlstm import bench

    argv = ["--hidden", "8", "--seq-len", "3", "--batch", "2", "--layers", "1", "--repeat", "2",
            "--min-repeat", "1", "--rounds", "1", "--settle", "0", "--no-plot", "--no-progress",
            "--no-memory", "--backends", "numpy", "--precision", mode, "--out", str(tmp_path), "--name", "p"]
    assert bench.main(argv) == 0
    rows = json.load(open(tmp_path / "p.json"))["rows"]
    assert rows and all(r["precision"] == mode and r["status"] == "ok" for r in rows)
    assert f"({mode} GEMMs)" in capsys.readouterr().out
    assert bench.main(argv[:-4] + ["--dtype", "float64", "--out", str(tmp_path), "--name", "q"]) == 2
    assert "--dtype float32" in capsys.readouterr().err


def test_resume_of_a_checkpoint_from_before_precision_modes(tmp_path):
    """A checkpoint whose config has no 'precision' was trained in float32: it resumes in float32,
    and --precision bf16 on it is refused instead of silently ignored."""
    import json

    from support import cli as tt

    run = tmp_path / "old"
    tt.xlstm("train", "--text", __file__, *tt.TINY, "--steps", "2", "--out", run, check=0)
    meta_path = run / "ckpt-000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["precision"]                      # as written before this option existed
    meta_path.write_text(json.dumps(meta))
    r = tt.xlstm("train", "--resume", run, "--precision", "bf16", "--steps", "3", "--no-progress", check=2)
    assert "--precision 'float32'" in r.stderr and "--precision 'bf16'" in r.stderr
    tt.xlstm("train", "--resume", run, "--steps", "3", "--no-progress", check=0)
    from xlstm.app.checkpoint import load_model
    assert load_model(str(run), backend="numpy")[0].precision == "float32"
