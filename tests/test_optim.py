"""SGD / Adam / AdamW against hand arithmetic and torch.optim; clipping; state round trip; schedule."""
import math

import numpy as np
import pytest

from xlstm.backends import available_backends
from xlstm.errors import InputError
from xlstm.layers import Dense, Embedding, Sequential
from xlstm.losses import cross_entropy
from xlstm.optim import SGD, Adam, clip_grad_norm, lr_schedule

G1 = [0.5, 1.0]      # gradient at step 1
G2 = [-0.2, 0.4]     # gradient at step 2


def two_steps(make_opt, p0=(1.0, -2.0)):
    """Run two steps of an optimiser over one parameter with the gradients G1 then G2."""
    params = {"p": np.array(p0)}
    grads = {"p": np.zeros(2)}
    opt = make_opt((params, grads))
    out = []
    for g in (G1, G2):
        grads["p"][...] = g
        opt.step()
        out.append(params["p"].copy())
    return out


# -- SGD, by hand ----------------------------------------------------------------------------

def test_sgd_plain():
    p1, p2 = two_steps(lambda pg: SGD(pg, lr=0.1))
    np.testing.assert_allclose(p1, [1 - 0.05, -2 - 0.1], rtol=1e-15)
    np.testing.assert_allclose(p2, [0.95 + 0.02, -2.1 - 0.04], rtol=1e-15)


def test_sgd_momentum():
    p1, p2 = two_steps(lambda pg: SGD(pg, lr=0.1, momentum=0.9))
    # step 1: buf = g1 = [0.5, 1.0]; p = [1 - 0.05, -2 - 0.1]
    np.testing.assert_allclose(p1, [0.95, -2.1], rtol=1e-15)
    # step 2: buf = 0.9*[0.5, 1.0] + [-0.2, 0.4] = [0.25, 1.3]; p -= 0.1 * buf
    np.testing.assert_allclose(p2, [0.95 - 0.025, -2.1 - 0.13], rtol=1e-14)


def test_sgd_nesterov():
    p1, p2 = two_steps(lambda pg: SGD(pg, lr=0.1, momentum=0.9, nesterov=True))
    # step 1: buf = [0.5, 1.0]; d = g + 0.9*buf = [0.95, 1.9]
    np.testing.assert_allclose(p1, [1 - 0.095, -2 - 0.19], rtol=1e-14)
    # step 2: buf = [0.25, 1.3]; d = [-0.2 + 0.225, 0.4 + 1.17] = [0.025, 1.57]
    np.testing.assert_allclose(p2, [0.905 - 0.0025, -2.19 - 0.157], rtol=1e-14)


def test_sgd_weight_decay():
    p1, p2 = two_steps(lambda pg: SGD(pg, lr=0.1, weight_decay=0.1))
    # step 1: d = g1 + 0.1*p = [0.5 + 0.1, 1.0 - 0.2] = [0.6, 0.8]
    np.testing.assert_allclose(p1, [0.94, -2.08], rtol=1e-15)
    # step 2: d = [-0.2 + 0.094, 0.4 - 0.208] = [-0.106, 0.192]
    np.testing.assert_allclose(p2, [0.94 + 0.0106, -2.08 - 0.0192], rtol=1e-14)


def test_sgd_does_not_change_the_gradients():
    params, grads = {"p": np.array([1.0, 2.0])}, {"p": np.array([0.5, 0.5])}
    SGD((params, grads), lr=0.1, momentum=0.5, weight_decay=0.3).step()
    np.testing.assert_array_equal(grads["p"], [0.5, 0.5])


# -- Adam, by hand ---------------------------------------------------------------------------

def test_adam_two_steps_by_hand():
    p1, p2 = two_steps(lambda pg: Adam(pg, lr=0.1))
    # component 0, g = 0.5 then -0.2
    m1, v1 = 0.1 * 0.5, 0.001 * 0.25                         # m = 0.05, v = 0.00025
    a1 = 1.0 - 0.1 * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + 1e-8)
    m2, v2 = 0.9 * m1 + 0.1 * -0.2, 0.999 * v1 + 0.001 * 0.04  # m = 0.025, v = 0.00028975
    a2 = a1 - 0.1 * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + 1e-8)
    # component 1, g = 1.0 then 0.4
    m1, v1 = 0.1 * 1.0, 0.001 * 1.0
    b1 = -2.0 - 0.1 * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + 1e-8)
    m2, v2 = 0.9 * m1 + 0.1 * 0.4, 0.999 * v1 + 0.001 * 0.16
    b2 = b1 - 0.1 * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + 1e-8)
    np.testing.assert_allclose(p1, [a1, b1], rtol=1e-13)
    np.testing.assert_allclose(p2, [a2, b2], rtol=1e-13)
    assert abs(a1 - 0.9) < 1e-7 and abs(a2 - (0.9 - 0.1 * (0.025 / 0.19) / math.sqrt(0.00028975 / 0.001999))) < 1e-7


def test_adamw_two_steps_by_hand():
    p1, p2 = two_steps(lambda pg: Adam(pg, lr=0.1, weight_decay=0.1, decoupled=True))
    # decoupled decay first multiplies p by 1 - lr*wd = 0.99, then the plain Adam step (same m, v as above)
    m1, v1 = 0.05, 0.00025
    a1 = 1.0 * 0.99 - 0.1 * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + 1e-8)
    m2, v2 = 0.025, 0.00028975
    a2 = a1 * 0.99 - 0.1 * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + 1e-8)
    m1, v1 = 0.1, 0.001
    b1 = -2.0 * 0.99 - 0.1 * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + 1e-8)
    m2, v2 = 0.13, 0.999 * 0.001 + 0.001 * 0.16
    b2 = b1 * 0.99 - 0.1 * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + 1e-8)
    np.testing.assert_allclose(p1, [a1, b1], rtol=1e-13)
    np.testing.assert_allclose(p2, [a2, b2], rtol=1e-13)


def test_adam_l2_two_steps_by_hand():
    p1, p2 = two_steps(lambda pg: Adam(pg, lr=0.1, weight_decay=0.1, decoupled=False))
    # L2: the gradient becomes g + 0.1*p before the moments
    g = 0.5 + 0.1 * 1.0                                        # 0.6
    m1, v1 = 0.1 * g, 0.001 * g * g
    a1 = 1.0 - 0.1 * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + 1e-8)
    g = -0.2 + 0.1 * a1
    m2, v2 = 0.9 * m1 + 0.1 * g, 0.999 * v1 + 0.001 * g * g
    a2 = a1 - 0.1 * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + 1e-8)
    g = 1.0 + 0.1 * -2.0                                       # 0.8
    m1, v1 = 0.1 * g, 0.001 * g * g
    b1 = -2.0 - 0.1 * (m1 / 0.1) / (math.sqrt(v1 / 0.001) + 1e-8)
    g = 0.4 + 0.1 * b1
    m2, v2 = 0.9 * m1 + 0.1 * g, 0.999 * v1 + 0.001 * g * g
    b2 = b1 - 0.1 * (m2 / 0.19) / (math.sqrt(v2 / 0.001999) + 1e-8)
    np.testing.assert_allclose(p1, [a1, b1], rtol=1e-13)
    np.testing.assert_allclose(p2, [a2, b2], rtol=1e-13)


# -- torch parity ----------------------------------------------------------------------------

TORCH_CASES = [
    ("SGD", dict(lr=0.1), dict(lr=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.01),
     dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled=False), dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, decoupled=False),
     dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1, decoupled=True), dict(lr=0.01, weight_decay=0.1)),
]


@pytest.mark.parametrize("kind,ours,theirs", TORCH_CASES)
def test_matches_torch_over_three_steps(kind, ours, theirs):
    torch = pytest.importorskip("torch", reason="torch not installed: no parity check against torch.optim")
    rng = np.random.default_rng(0)
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = (SGD if kind == "SGD" else Adam)((params, grads), **ours)
    topt = getattr(torch.optim, kind)(list(tparams.values()), foreach=False, **theirs)
    worst = 0.0
    for _ in range(3):
        for k in params:
            g = rng.standard_normal(params[k].shape)
            grads[k][...] = g
            tparams[k].grad = torch.tensor(g)
        opt.step()
        topt.step()
        for k in params:
            worst = max(worst, float(np.abs(params[k] - tparams[k].detach().numpy()).max()))
    assert worst < 1e-10, worst


# -- clipping --------------------------------------------------------------------------------

def test_clip_grad_norm_by_hand():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}     # global norm sqrt(9 + 16) = 5
    assert clip_grad_norm(grads, 10.0) == 5.0
    np.testing.assert_array_equal(grads["a"], [3.0, 0.0])             # below the limit: untouched
    assert clip_grad_norm(grads, 1.0) == 5.0                           # returns the norm before clipping
    np.testing.assert_allclose(grads["a"], [0.6, 0.0], rtol=1e-15)
    np.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-15)
    assert math.isclose(clip_grad_norm(grads, 1.0), 1.0, rel_tol=1e-15)


def test_clip_grad_norm_on_a_module_and_bad_input():
    d = Dense(2, 2, dtype="float64", backend="numpy")
    d.grads["W"][...] = [[1.0, 1.0], [1.0, 1.0]]
    d.grads["b"][...] = [2.0, 2.0]                                     # norm sqrt(4 + 8) = sqrt(12)
    n = clip_grad_norm(d, 0.5)
    assert math.isclose(n, math.sqrt(12.0), rel_tol=1e-15)
    np.testing.assert_allclose(d.grads["b"], 2.0 * 0.5 / math.sqrt(12.0), rtol=1e-15)
    with pytest.raises(InputError, match="max_norm"):
        clip_grad_norm(d, 0.0)
    with pytest.raises(InputError, match="max_norm"):
        clip_grad_norm(d, "big")
    with pytest.raises(InputError, match="grads_dict_or_module"):
        clip_grad_norm(3.0, 1.0)
    d.grads["b"][0] = np.inf
    assert clip_grad_norm(d, 1.0) == math.inf
    assert d.grads["b"][1] == pytest.approx(2.0 * 0.5 / math.sqrt(12.0))        # not scaled by 0


# -- module use, state, schedule -----------------------------------------------------------

def test_optimiser_reads_params_each_step_and_zero_grad():
    d = Dense(2, 1, dtype="float64", seed=0, backend="numpy")
    opt = Adam(d, lr=0.1)
    d.grads["W"][...] = 1.0
    opt.step()
    d.params["W"] = d.params["W"].copy()        # what .to() does: a new array under the same name
    new = d.params["W"]
    before = new.copy()
    opt.step()
    assert d.params["W"] is new and np.all(new < before)
    opt.zero_grad()
    assert not any(np.any(g) for g in d.grads.values())


@pytest.mark.parametrize("make", [lambda m: Adam(m, lr=0.05, weight_decay=0.01),
                                  lambda m: SGD(m, lr=0.05, momentum=0.9)])
def test_state_dict_round_trip_is_exact(make):
    rng = np.random.default_rng(5)
    a = Sequential(Embedding(5, 3, dtype="float32", seed=0, backend="numpy"),
                   Dense(3, 5, dtype="float32", seed=1, backend="numpy"))
    opt_a = make(a)
    grads = [{k: rng.standard_normal(g.shape).astype(np.float32) for k, g in a.grads.items()} for _ in range(3)]

    def step(model, opt, g):
        for k, v in g.items():
            model.grads[k][...] = v
        opt.step()

    step(a, opt_a, grads[0])
    step(a, opt_a, grads[1])
    saved_model, saved_opt = a.state_dict(), opt_a.state_dict()
    assert saved_opt["step"] == 2
    assert all(isinstance(x, np.ndarray) for st in saved_opt["state"].values() for x in st.values())

    b = Sequential(Embedding(5, 3, dtype="float32", seed=7, backend="numpy"),
                   Dense(3, 5, dtype="float32", seed=8, backend="numpy"))
    opt_b = make(b)
    opt_b.lr = 123.0                              # overwritten by the load, as in torch
    b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    for st in saved_opt["state"].values():        # the load copied: changing the dict changes nothing
        for x in st.values():
            x[...] = 99.0
    step(a, opt_a, grads[2])
    step(b, opt_b, grads[2])
    assert opt_b.step_count == 3 and opt_b.lr == 0.05
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_load_state_dict_refuses_mismatches():
    d = Dense(2, 2, backend="numpy")
    opt = Adam(d)
    d.grads["W"][...] = 1.0
    opt.step()
    sd = opt.state_dict()
    e = Dense(3, 2, backend="numpy")
    with pytest.raises(InputError, match="'W'.*shape"):
        Adam(e).load_state_dict(sd)
    with pytest.raises(InputError, match="unknown parameters"):
        Adam(Embedding(3, 2, backend="numpy")).load_state_dict(sd)
    with pytest.raises(InputError, match="unknown buffers"):
        SGD(d, lr=0.1, momentum=0.5).load_state_dict(sd)


def test_bad_hyperparameters_name_the_argument():
    pg = ({"p": np.zeros(2)}, {"p": np.zeros(2)})
    for kwargs, name in [(dict(lr=-1.0), "lr"), (dict(lr=0.1, momentum=1.5), "momentum"),
                         (dict(lr=0.1, weight_decay=-0.1), "weight_decay"),
                         (dict(lr=0.1, nesterov=True), "nesterov")]:
        with pytest.raises(InputError, match=name):
            SGD(pg, **kwargs)
    for kwargs, name in [(dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
                         (dict(betas=0.9), "betas"), (dict(eps=0.0), "eps"), (dict(lr=float("nan")), "lr")]:
        with pytest.raises(InputError, match=name):
            Adam(pg, **kwargs)
    with pytest.raises(InputError, match="module_or_params_grads"):
        Adam([1, 2, 3])
    with pytest.raises(InputError, match="'p' has no gradient"):
        SGD(({"p": np.zeros(2)}, {}), lr=0.1).step()


def test_lr_schedule_values():
    # warm-up over 4 steps: 1/4, 2/4, 3/4, 4/4 of the base
    assert [lr_schedule(s, 1.0, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_schedule(4, 1.0, 4, 14) == 1.0                       # cosine starts at the top
    assert lr_schedule(9, 1.0, 4, 14) == pytest.approx(0.5)        # halfway: cos(pi/2) = 0
    assert lr_schedule(14, 1.0, 4, 14) == pytest.approx(0.0, abs=1e-15)
    assert lr_schedule(100, 1.0, 4, 14, min_lr=0.1) == pytest.approx(0.1)
    assert lr_schedule(9, 2.0, 4, 14, min_lr=1.0) == pytest.approx(1.5)
    assert lr_schedule(100, 3e-4, 0, 10, kind="constant") == 3e-4
    assert lr_schedule(0, 3e-4, 2, 10, kind="constant") == 1.5e-4
    with pytest.raises(InputError, match="kind"):
        lr_schedule(0, 1.0, 0, 10, kind="linear")
    with pytest.raises(InputError, match="step"):
        lr_schedule(-1, 1.0, 0, 10)
    with pytest.raises(InputError, match="total"):
        lr_schedule(0, 1.0, 10, 10)


def test_training_reduces_the_loss():
    """Embedding -> Dense learns a next-token map with Adam, clipping and the schedule together."""
    rng = np.random.default_rng(6)
    model = Sequential(Embedding(8, 16, seed=0, backend="numpy"), Dense(16, 8, seed=1, backend="numpy"))
    opt = Adam(model, lr=0.05)
    ids = rng.integers(0, 8, size=(10, 4))
    targets = (ids + 3) % 8
    losses = []
    for s in range(60):
        opt.lr = lr_schedule(s, 0.05, 5, 60)
        opt.zero_grad()
        loss, d = cross_entropy(model.forward(ids), targets)
        model.backward(d)
        clip_grad_norm(model, 5.0)
        opt.step()
        losses.append(loss)
    assert losses[0] > 1.5 and losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("backend", available_backends())
def test_optimisers_same_on_every_backend(backend):
    """After .to(backend) the optimiser follows the moved arrays; CuPy gives the NumPy numbers."""
    g0 = np.random.default_rng(7).standard_normal((3, 2))
    results = []
    for target in ("numpy", backend):
        d = Dense(3, 2, dtype="float64", seed=0, backend="numpy")
        opts = [Adam(d, lr=0.1, weight_decay=0.1), SGD(d, lr=0.1, momentum=0.9, nesterov=True)]
        d.grads["W"][...] = g0
        for o in opts:
            o.step()
        d.to(target)                             # state buffers must follow the parameters
        d.grads["W"][...] = d.backend.asarray(2 * g0)
        for o in opts:
            o.step()
        clip_grad_norm(d, 0.1)
        results.append((d.backend.to_numpy(d.params["W"]), d.backend.to_numpy(d.grads["W"])))
    for x, y in zip(results[0], results[1]):
        np.testing.assert_allclose(y, x, rtol=1e-12)
