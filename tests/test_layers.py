"""Dense, Embedding, Sequential: values by hand, float64 finite-difference gradients, torch parity."""
import numpy as np
import pytest

from xlstm.backends import available_backends
from xlstm.errors import InputError, StateError
from xlstm.gradcheck import numerical_gradient
from xlstm.layers import SCATTER_METHODS, Dense, Embedding, Sequential, scatter_add_rows
from xlstm.module import Module


numgrad = numerical_gradient   # central differences, float64


def assert_grad(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# -- Dense ---------------------------------------------------------------------------------

def test_dense_forward_by_hand():
    d = Dense(3, 2, dtype="float64", backend="numpy")
    d.params["W"][...] = [[1, 2], [3, 4], [5, 6]]
    d.params["b"][...] = [0.5, -1]
    y = d.forward(np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]))
    # row 0: [1-5+0.5, 2-6-1]; row 1: 2*[3, 4] + b
    np.testing.assert_array_equal(y, [[-3.5, -5.0], [6.5, 7.0]])


def test_dense_init_like_torch_and_seeded():
    d = Dense(16, 7, seed=3, backend="numpy")
    assert d.params["W"].shape == (16, 7) and d.params["b"].shape == (7,)
    assert d.params["W"].dtype == np.float32 and d.grads["W"].dtype == np.float32
    k = 1 / 4.0
    assert np.abs(d.params["W"]).max() <= k and np.abs(d.params["b"]).max() <= k
    assert np.abs(d.params["W"]).max() > 0.8 * k          # spread over the range, not tiny
    np.testing.assert_array_equal(d.params["W"], Dense(16, 7, seed=3, backend="numpy").params["W"])
    assert not np.array_equal(d.params["W"], Dense(16, 7, seed=4, backend="numpy").params["W"])
    assert not np.any(d.grads["W"])


@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradcheck_float64(bias):
    rng = np.random.default_rng(0)
    d = Dense(4, 3, bias=bias, dtype="float64", seed=1, backend="numpy")
    x = rng.standard_normal((2, 3, 4))          # extra leading axes are batch axes
    R = rng.standard_normal((2, 3, 3))          # loss = sum(y * R), so dy = R

    def loss():
        return float((d.forward(x) * R).sum())

    d.forward(x)
    dx = d.backward(R)
    assert dx.shape == x.shape
    assert_grad(d.grads["W"], numgrad(loss, d.params["W"]))
    if bias:
        assert_grad(d.grads["b"], numgrad(loss, d.params["b"]))
    else:
        assert "b" not in d.params
    assert_grad(dx, numgrad(loss, x))


def test_dense_backward_accumulates():
    rng = np.random.default_rng(1)
    d = Dense(3, 2, dtype="float64", backend="numpy")
    x, dy = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    d.forward(x)
    d.backward(dy)
    once = {k: g.copy() for k, g in d.grads.items()}
    np.testing.assert_allclose(once["W"], x.T @ dy, rtol=1e-12)
    np.testing.assert_allclose(once["b"], dy.sum(0), rtol=1e-12)
    d.backward(dy)
    for k in once:
        np.testing.assert_allclose(d.grads[k], 2 * once[k], rtol=1e-12)
    d.zero_grad()
    assert not any(np.any(g) for g in d.grads.values())


def test_dense_matches_torch_linear():
    torch = pytest.importorskip("torch", reason="torch not installed: no parity check against nn.Linear")
    rng = np.random.default_rng(2)
    lin = torch.nn.Linear(5, 4, dtype=torch.float64)
    d = Dense(5, 4, dtype="float64", backend="numpy")
    d.params["W"][...] = lin.weight.detach().numpy().T     # torch stores [out, in]
    d.params["b"][...] = lin.bias.detach().numpy()
    x = rng.standard_normal((3, 2, 5))
    dy = rng.standard_normal((3, 2, 4))
    xt = torch.tensor(x, requires_grad=True)
    yt = lin(xt)
    yt.backward(torch.tensor(dy))
    y = d.forward(x)
    dx = d.backward(dy)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(d.grads["W"], lin.weight.grad.numpy().T, rtol=0, atol=1e-10)
    np.testing.assert_allclose(d.grads["b"], lin.bias.grad.numpy(), rtol=0, atol=1e-10)


def test_dense_bad_inputs_name_the_argument():
    d = Dense(3, 2, dtype="float64", backend="numpy")
    with pytest.raises(InputError, match="in_features"):
        Dense(0, 2)
    with pytest.raises(InputError, match="out_features"):
        Dense(2, 1.5)
    with pytest.raises(InputError, match="dtype"):
        Dense(2, 2, dtype="int32")
    with pytest.raises(StateError, match="before forward"):
        d.backward(np.zeros((1, 2)))
    with pytest.raises(InputError, match=r"\bx\b.*in_features"):
        d.forward(np.zeros((4, 5)))
    with pytest.raises(InputError, match=r"\bx\b.*float32"):
        d.forward(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"\bx\b.*NaN"):
        d.forward(np.full((1, 3), np.nan))
    d.forward(np.zeros((4, 3)))
    with pytest.raises(InputError, match=r"\bdy\b"):
        d.backward(np.zeros((4, 3)))


# -- Embedding -------------------------------------------------------------------------------

def test_embedding_forward_is_a_lookup():
    e = Embedding(4, 2, dtype="float64", backend="numpy")
    e.params["E"][...] = [[0, 1], [2, 3], [4, 5], [6, 7]]
    y = e.forward([[0, 2], [3, 3]])
    np.testing.assert_array_equal(y, [[[0, 1], [4, 5]], [[6, 7], [6, 7]]])
    assert e.forward(np.int32(1)).shape == (2,)


def test_embedding_init_standard_normal_seeded():
    e = Embedding(300, 40, seed=0, backend="numpy")
    E = e.params["E"]
    assert E.shape == (300, 40) and E.dtype == np.float32
    assert abs(float(E.mean())) < 0.03 and abs(float(E.std()) - 1.0) < 0.03
    np.testing.assert_array_equal(E, Embedding(300, 40, seed=0, backend="numpy").params["E"])


@pytest.mark.parametrize("method", SCATTER_METHODS)
def test_embedding_gradcheck_repeated_ids(method):
    rng = np.random.default_rng(3)
    e = Embedding(5, 3, dtype="float64", seed=2, backend="numpy", grad_method=method)
    ids = np.array([[1, 3, 1], [0, 1, 3]])                # 1 three times, 3 twice, 2 and 4 never
    R = rng.standard_normal((2, 3, 3))

    def loss():
        return float((e.forward(ids) * R).sum())

    e.forward(ids)
    assert e.backward(R) is None
    assert_grad(e.grads["E"], numgrad(loss, e.params["E"]))
    np.testing.assert_allclose(e.grads["E"][1], R[0, 0] + R[0, 2] + R[1, 1], rtol=1e-12)
    assert not np.any(e.grads["E"][[2, 4]])


def _ids_with_runs(rng, V, N):
    """Random ids in [0, V) where id 0 fills a third of the positions (a long segment, as a
    space in text) and the rest are uniform."""
    ids = rng.integers(0, V, N)
    ids[: N // 3] = 0
    return rng.permutation(ids)


@pytest.mark.parametrize("method", ["sort", "onehot"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("V,N,dim", [(1, 1, 1), (1, 7, 2), (3, 1, 4), (5, 37, 3), (7, 100, 5), (200, 64, 8),
                                     (65, 1000, 16)])
def test_scatter_add_rows_matches_np_add_at(method, dtype, V, N, dim):
    """Both deterministic ways equal np.add.at (sequential, the definition) up to the order of
    the additions, accumulate into what ``out`` held, and leave ids and rows as they were."""
    rng = np.random.default_rng(V * 1000 + N)
    ids = _ids_with_runs(rng, V, N)
    rows = rng.standard_normal((N, dim)).astype(dtype)
    out0 = rng.standard_normal((V, dim)).astype(dtype)
    ref = out0.astype(np.float64)
    np.add.at(ref, ids, rows.astype(np.float64))
    out = out0.copy()
    ids_in, rows_in = ids.copy(), rows.copy()
    scatter_add_rows(np, out, ids, rows, method)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out, ref, rtol=1e-12 if dtype == "float64" else 2e-5,
                               atol=1e-12 if dtype == "float64" else 2e-5 * np.sqrt(N))
    np.testing.assert_array_equal(ids, ids_in)
    np.testing.assert_array_equal(rows, rows_in)
    again = out0.copy()
    scatter_add_rows(np, again, ids, rows, method)
    np.testing.assert_array_equal(again, out)             # same input, same bits


def test_scatter_add_rows_sort_sums_a_segment_exactly_when_exact():
    """Integer-valued rows: any order of the additions is exact, so the segment sums must be
    exactly the counts-weighted sums; a missed scan pass (segment longer than a power of two)
    or a row added twice shows up as a wrong integer."""
    rng = np.random.default_rng(0)
    for N in (1, 2, 3, 5, 8, 9, 16, 17, 33, 100, 257):
        ids = np.sort(rng.integers(0, 4, N))[::-1].copy()   # long runs, unsorted order
        rows = rng.integers(-5, 6, (N, 3)).astype(np.float64)
        ref = np.zeros((4, 3))
        np.add.at(ref, ids, rows)
        for method in ("sort", "onehot"):
            out = np.zeros((4, 3))
            scatter_add_rows(np, out, ids, rows, method)
            np.testing.assert_array_equal(out, ref, err_msg=f"{method} N={N}")


@pytest.mark.parametrize("method", ["sort", "onehot"])
@pytest.mark.parametrize("idtype", ["uint8", "int16", "int32", "uint64"])
def test_scatter_add_rows_any_integer_ids(method, idtype):
    """Small id dtypes with a vocabulary past their range of the other: V = 300 > 255."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, min(300, np.iinfo(idtype).max), 50).astype(idtype)
    rows = rng.standard_normal((50, 2))
    ref = np.zeros((300, 2))
    np.add.at(ref, ids, rows)
    out = np.zeros((300, 2))
    scatter_add_rows(np, out, ids, rows, method)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


def test_scatter_add_rows_empty_and_bad_method():
    out = np.ones((3, 2))
    for method in SCATTER_METHODS:
        scatter_add_rows(np, out, np.zeros(0, np.int64), np.zeros((0, 2)), method)
    np.testing.assert_array_equal(out, 1.0)
    with pytest.raises(InputError, match="method"):
        scatter_add_rows(np, out, np.zeros(1, np.int64), np.zeros((1, 2)), "atomic")
    with pytest.raises(InputError, match="grad_method"):
        Embedding(3, 2, grad_method="add.at")


@pytest.mark.parametrize("method", SCATTER_METHODS)
def test_embedding_grad_against_torch(method):
    """The embedding gradient equals torch.nn.functional.embedding's (float64, repeated ids)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    e = Embedding(11, 6, dtype="float64", seed=1, backend="numpy", grad_method=method)
    ids = _ids_with_runs(rng, 11, 60).reshape(12, 5)
    dy = rng.standard_normal((12, 5, 6))
    e.forward(ids)
    e.backward(dy)
    E = torch.tensor(e.params["E"], requires_grad=True)
    torch.nn.functional.embedding(torch.from_numpy(ids), E).backward(torch.from_numpy(dy))
    np.testing.assert_allclose(e.grads["E"], E.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_embedding_bad_ids():
    e = Embedding(4, 2, backend="numpy")
    with pytest.raises(InputError, match=r"ids.*\[0, 4\)"):
        e.forward([0, 4])
    with pytest.raises(InputError, match=r"ids.*\[0, 4\)"):
        e.forward([-1, 2])
    with pytest.raises(InputError, match="ids.*integer"):
        e.forward(np.array([0.0, 1.0]))
    with pytest.raises(InputError, match="ids.*integer"):
        e.forward(np.array([True, False]))
    with pytest.raises(InputError, match="num_embeddings"):
        Embedding(0, 2)
    with pytest.raises(StateError):
        Embedding(3, 2, backend="numpy").backward(np.zeros((1, 2), np.float32))
    e.forward([[1, 2]])
    with pytest.raises(InputError, match=r"\bdy\b"):
        e.backward(np.zeros((2, 2), np.float32))


# -- Sequential ---------------------------------------------------------------------------

def _emb_dense(seed=0):
    return Sequential(Embedding(6, 4, dtype="float64", seed=seed, backend="numpy"),
                      Dense(4, 3, dtype="float64", seed=seed + 1, backend="numpy"))


def test_sequential_embedding_dense_gradcheck():
    rng = np.random.default_rng(4)
    seq = _emb_dense()
    ids = np.array([[0, 5, 5, 2], [1, 0, 5, 3]])
    R = rng.standard_normal((2, 4, 3))
    assert sorted(seq.params) == ["0.E", "1.W", "1.b"]
    assert sorted(seq.grads) == sorted(seq.params)

    def loss():
        return float((seq.forward(ids) * R).sum())

    y = seq.forward(ids)
    np.testing.assert_allclose(y, seq[0].params["E"][ids] @ seq[1].params["W"] + seq[1].params["b"], rtol=1e-12)
    assert seq.backward(R) is None
    for k, p in seq.params.items():
        assert_grad(seq.grads[k], numgrad(loss, p))
    seq.zero_grad()
    assert not any(np.any(g) for g in seq.grads.values())


def test_sequential_params_are_the_childrens_arrays_after_to():
    seq = _emb_dense()
    before = seq.state_dict()
    x = np.array([[1, 2, 3]])
    y0 = seq.forward(x)
    assert seq.to("numpy") is seq
    assert seq.params["1.W"] is seq[1].params["W"] and seq.grads["0.E"] is seq[0].grads["E"]
    seq[1].params["W"] = seq[1].params["W"] * 2       # a child replaces its array ...
    assert seq.params["1.W"] is seq[1].params["W"]     # ... and the merged view follows
    seq[1].params["W"] = seq[1].params["W"] / 2
    after = seq.state_dict()
    assert sorted(after) == sorted(before)
    for k in before:
        assert isinstance(after[k], np.ndarray)
        np.testing.assert_array_equal(after[k], before[k])
    np.testing.assert_array_equal(seq.forward(x), y0)
    assert seq.num_parameters() == 6 * 4 + 4 * 3 + 3


def test_sequential_state_dict_round_trip_and_modes():
    a, b = _emb_dense(0), _emb_dense(10)
    sd = a.state_dict()
    sd["1.b"][0] = 123.0                 # a copy: changing it leaves the model alone
    assert a.params["1.b"][0] != 123.0
    b.load_state_dict(a.state_dict())
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    with pytest.raises(InputError, match="missing keys.*1.b"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "1.b"})
    b.eval()
    assert not b.training and not b[0].training and not b[1].training
    b.train()
    assert b.training and b[1].training


class _Stateful(Module):
    """A stand-in with the LSTM's call convention: y = 2 x + h0, state returned as (h, c)."""

    def __init__(self):
        super().__init__(dtype="float64", backend="numpy")
        self.seen = {}

    def forward(self, x, state=None, lengths=None):
        self.seen = {"state": state, "lengths": lengths}
        h0 = 0.0 if state is None else state[0]
        y = 2 * x + h0
        return y, (y.sum(0), -y.sum(0))

    def backward(self, dy, dstate=None):
        return 2 * dy, (dy.sum(0), None)


def test_sequential_passes_state_and_kwargs_and_keeps_the_state():
    st = _Stateful()
    seq = Sequential(Dense(2, 2, dtype="float64", seed=0, backend="numpy"), st,
                     Dense(2, 1, dtype="float64", seed=1, backend="numpy"))
    x = np.ones((3, 2))
    y = seq.forward(x, lengths=[3])
    assert y.shape == (3, 1)
    assert st.seen == {"state": None, "lengths": [3]}
    h, c = seq.last_state
    np.testing.assert_allclose(c, -h)
    assert seq.states[1] is seq.last_state
    seq.forward(x, state=seq.last_state)       # carry the state into the next window
    np.testing.assert_array_equal(st.seen["state"][0], h)
    dx = seq.backward(np.ones((3, 1)))
    expected = 2 * (np.ones((3, 1)) @ seq[2].params["W"].T) @ seq[0].params["W"].T
    np.testing.assert_allclose(dx, expected, rtol=1e-12)
    with pytest.raises(InputError, match="bogus"):
        seq.forward(x, bogus=1)
    with pytest.raises(InputError, match="state"):
        _emb_dense().forward([1], state=(1, 2))
    assert _emb_dense().last_state is None


def test_sequential_with_lstm_carries_state():
    import xlstm

    lstm = xlstm.LSTM(4, 5, dtype="float64", seed=0, backend="numpy")
    seq = Sequential(Embedding(7, 4, dtype="float64", seed=0, backend="numpy"), lstm,
                     Dense(5, 7, dtype="float64", seed=1, backend="numpy"))
    ids = np.array([[1, 2], [3, 4], [5, 6]])            # [T=3, B=2]
    y = seq.forward(ids)
    assert y.shape == (3, 2, 7)
    h, c = seq.last_state
    assert h.shape == (1, 2, 5) and c.shape == (1, 2, 5)
    y2 = seq.forward(ids, state=seq.last_state)
    assert not np.allclose(y2, y)                         # the carried state changed the output
    assert seq.backward(np.ones_like(y2)) is None
    assert any(k.startswith("1.") for k in seq.grads) and np.any(seq.grads["0.E"])


def test_sequential_refuses_bad_modules():
    with pytest.raises(InputError, match="at least one"):
        Sequential()
    with pytest.raises(InputError, match=r"modules\[1\]"):
        Sequential(Dense(2, 2, backend="numpy"), object())


@pytest.mark.parametrize("backend", available_backends())
def test_layers_same_on_every_backend(backend):
    """On a GPU machine the CuPy path (xp.add.at, matmul) must give the NumPy numbers."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 6, size=(3, 4))
    R = rng.standard_normal((3, 4, 3))
    ref, dev = _emb_dense(), _emb_dense().to(backend)
    y_ref = ref.forward(ids)
    ref.backward(R)
    y = dev.forward(ids)
    dev.backward(dev.backend.asarray(R))
    np.testing.assert_allclose(dev.backend.to_numpy(y), y_ref, rtol=1e-12)
    for k, g in ref.grads.items():
        np.testing.assert_allclose(dev.backend.to_numpy(dev.grads[k]), g, rtol=1e-12, atol=1e-14)
    assert dev.to("numpy").params["0.E"].__class__ is np.ndarray
