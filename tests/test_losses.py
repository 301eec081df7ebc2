"""softmax / log_softmax / cross_entropy: reference values, finite differences, extremes, torch parity."""
import warnings

import numpy as np
import pytest

from xlstm.backends import available_backends, backend_of, resolve
from xlstm.errors import InputError
from xlstm.gradcheck import numerical_gradient
from xlstm.losses import cross_entropy, log_softmax, softmax

# shared/vectors/tf_reference_values.md (beside the repository), section 3
REF_LOGITS = np.array([[1.0, 3.0, 5.0, 7.0], [1.0, -9.0, 4.0, 8.0]])
REF_TARGETS = np.array([3, 1])
REF_SOFTMAX = np.array([[2.14400878e-03, 1.58422012e-02, 1.17058913e-01, 8.64954877e-01],
                        [8.94679461e-04, 4.06183847e-08, 1.79701173e-02, 9.81135163e-01]])
REF_CE = np.array([0.14507794, 17.01904505])


numgrad = numerical_gradient   # central differences, float64


def test_reference_softmax_rows():
    np.testing.assert_allclose(softmax(REF_LOGITS), REF_SOFTMAX, rtol=1e-6)
    np.testing.assert_allclose(np.exp(log_softmax(REF_LOGITS)), REF_SOFTMAX, rtol=1e-6)


def test_reference_cross_entropy_per_row_and_gradient():
    per_row = -log_softmax(REF_LOGITS)[np.arange(2), REF_TARGETS]
    np.testing.assert_allclose(per_row, REF_CE, rtol=1e-6)
    for r in range(2):          # a mask selecting one row gives that row's loss as the mean
        mask = np.arange(2) == r
        loss, _ = cross_entropy(REF_LOGITS, REF_TARGETS, mask=mask)
        np.testing.assert_allclose(loss, REF_CE[r], rtol=1e-6)
    loss, dlogits = cross_entropy(REF_LOGITS, REF_TARGETS)
    np.testing.assert_allclose(loss, REF_CE.mean(), rtol=1e-6)
    onehot = np.array([[0, 0, 0, 1], [0, 1, 0, 0]])
    np.testing.assert_allclose(dlogits, (REF_SOFTMAX - onehot) / 2, rtol=1e-6)


def test_softmax_axis_and_normalisation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 5))
    for axis in (0, 1, -1):
        s = softmax(x, axis=axis)
        np.testing.assert_allclose(s.sum(axis=axis), 1.0, rtol=1e-12)
        np.testing.assert_allclose(s, np.exp(x) / np.exp(x).sum(axis=axis, keepdims=True), rtol=1e-12)
        np.testing.assert_allclose(log_softmax(x, axis=axis), np.log(s), rtol=1e-12, atol=1e-14)
    assert softmax(x.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("masked", [False, True])
def test_cross_entropy_gradcheck_float64(masked):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 5)) * 3
    t = rng.integers(0, 5, size=(3, 2))
    mask = np.array([[1, 1], [1, 0], [0, 1]]) if masked else None
    loss, d = cross_entropy(x, t, mask)
    np.testing.assert_allclose(d, numgrad(lambda: cross_entropy(x, t, mask)[0], x), rtol=1e-6, atol=1e-9)
    if masked:
        assert not np.any(d[1, 1]) and not np.any(d[2, 0])
        per = -log_softmax(x)[np.arange(3)[:, None], np.arange(2)[None, :], t]
        np.testing.assert_allclose(loss, (per[0, 0] + per[0, 1] + per[1, 0] + per[2, 1]) / 4, rtol=1e-12)


def test_bool_mask_equals_01_mask():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3))
    t = np.array([0, 2, 1, 1])
    a = cross_entropy(x, t, np.array([1.0, 0.0, 1.0, 1.0]))
    b = cross_entropy(x, t, np.array([True, False, True, True]))
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_no_overflow_for_huge_logits():
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # underflow of exp(-2e4) to 0 is the correct answer; everything else must stay clean
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            s = softmax(x)
            ls = log_softmax(x)
            loss, d = cross_entropy(x, np.array([1, 2]))
            loss32, d32 = cross_entropy(x.astype(np.float32), np.array([1, 2]))
    np.testing.assert_array_equal(s, [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(ls, [[0, -2e4, -1e4], [-2e4, -2e4, 0]], rtol=1e-12)
    np.testing.assert_allclose(loss, (2e4 + 0.0) / 2, rtol=1e-12)     # row 0 misses by 2e4, row 1 is right
    np.testing.assert_allclose(d, [[0.5, -0.5, 0], [0, 0, 0]], atol=1e-300)
    assert np.isfinite(loss32) and np.all(np.isfinite(d32)) and d32.dtype == np.float32


def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch", reason="torch not installed: no parity check against F.cross_entropy")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4, 7)) * 4
    t = rng.integers(0, 7, size=(6, 4))
    mask = (rng.random((6, 4)) < 0.6).astype(np.float64)
    mask[0, 0] = 1
    xt = torch.tensor(x, requires_grad=True)
    ref = F.cross_entropy(xt.reshape(-1, 7), torch.tensor(t).reshape(-1))
    ref.backward()
    loss, d = cross_entropy(x, t)
    np.testing.assert_allclose(loss, ref.item(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(d, xt.grad.numpy(), rtol=0, atol=1e-10)

    xt.grad = None
    mt = torch.tensor(mask)
    per = F.cross_entropy(xt.reshape(-1, 7), torch.tensor(t).reshape(-1), reduction="none").reshape(6, 4)
    ref = (per * mt).sum() / mt.sum()
    ref.backward()
    loss, d = cross_entropy(x, t, mask)
    np.testing.assert_allclose(loss, ref.item(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(d, xt.grad.numpy(), rtol=0, atol=1e-10)


def test_bad_inputs_name_the_argument():
    x = np.zeros((2, 3))
    with pytest.raises(InputError, match=r"targets.*\[0, 3\)"):
        cross_entropy(x, [0, 3])
    with pytest.raises(InputError, match=r"targets.*\[0, 3\)"):
        cross_entropy(x, [-1, 0])
    with pytest.raises(InputError, match="targets.*integer"):
        cross_entropy(x, np.array([0.0, 1.0]))
    with pytest.raises(InputError, match="targets.*shape"):
        cross_entropy(x, [0, 1, 2])
    with pytest.raises(InputError, match="mask.*no nonzero"):
        cross_entropy(x, [0, 1], mask=[0, 0])
    with pytest.raises(InputError, match="mask.*0 and 1"):
        cross_entropy(x, [0, 1], mask=[0.5, 1])
    with pytest.raises(InputError, match="mask.*shape"):
        cross_entropy(x, [0, 1], mask=[1, 1, 1])
    with pytest.raises(InputError, match="logits.*NaN"):
        cross_entropy(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(InputError, match="logits"):
        softmax(np.zeros((2, 0)))


@pytest.mark.parametrize("backend", available_backends())
def test_same_on_every_backend(backend):
    """Logits on a backend stay there; CuPy gives the NumPy numbers."""
    b = resolve(backend)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3, 6))
    t = rng.integers(0, 6, size=(5, 3))
    mask = rng.random((5, 3)) < 0.5
    mask[0, 0] = True
    loss_ref, d_ref = cross_entropy(x, t, mask)
    loss, d = cross_entropy(b.asarray(x), t, mask)
    assert backend_of(d) is b
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    np.testing.assert_allclose(b.to_numpy(d), d_ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(b.to_numpy(softmax(b.asarray(x))), softmax(x), rtol=1e-12)
