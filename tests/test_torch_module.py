"""xlstm.torch.LSTM: the nn.Module whose gradient is xlstm's BPTT.

Checked against independent references: torch's finite differences (gradcheck, float64) and
torch.nn.LSTM (its own kernels and autograd) with the same weights.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

import xlstm
from xlstm.errors import InputError
from xlstm.gradcheck import scaled_error
from support.cli import xlstm as xlstm_cli

torch = pytest.importorskip("torch", reason="torch is not installed; xlstm.torch needs it (pip install 'xlstm-bptt[torch]')")
import xlstm.torch as xt  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-12, F32: 1e-5}


def test_import_xlstm_does_not_import_torch():
    code = "import sys, xlstm, xlstm.interop, xlstm.app.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_xlstm_torch_does_not_import_cupy():
    code = "import sys, xlstm.torch; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- gradcheck (float64 finite differences over input, state and every parameter) --------------
def _gradcheck(m, x, hx=None, lengths=None, seed=None):
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in m.named_parameters()]
    state = () if hx is None else tuple(t.detach().clone().requires_grad_(True) for t in hx)

    def f(x, *rest):
        hx_, ps = (rest[:2], rest[2:]) if state else (None, rest)
        if seed is not None:
            torch.manual_seed(seed)                # the same masks in every evaluation
        inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, (h, c) = torch.func.functional_call(m, dict(zip(names, ps)), (inp, hx_))
        if lengths is not None:
            y = pad_packed_sequence(y, total_length=x.shape[0])[0]
        return y, h, c

    x = x.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, *state, *params), eps=1e-6, atol=1e-7, rtol=1e-6)


def _module(D, H, **kw):
    torch.manual_seed(3)
    m = xt.LSTM(D, H, dtype=F64, **kw)
    with torch.no_grad():                          # non-trivial gains and shifts
        for n, p in m.named_parameters():
            if n.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True),
    dict(layer_norm=True),
    dict(layer_norm=True, num_layers=2, bidirectional=True),
    dict(forget_bias=1.0),
    dict(bias=False),
], ids=str)
def test_gradcheck(kw):
    m = _module(3, 2, **kw)
    x = torch.randn(4, 3, 3, dtype=F64)
    _gradcheck(m, x)


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True), dict(layer_norm=True)], ids=str)
def test_gradcheck_initial_state(kw):
    m = _module(3, 2, **kw)
    S = (m.num_layers * (2 if m.bidirectional else 1), 3, 2)
    _gradcheck(m, torch.randn(4, 3, 3, dtype=F64), hx=(torch.randn(S, dtype=F64), torch.randn(S, dtype=F64)))


@pytest.mark.parametrize("kw", [dict(), dict(bidirectional=True, num_layers=2), dict(layer_norm=True, bidirectional=True)],
                         ids=str)
def test_gradcheck_packed_variable_lengths(kw):
    m = _module(3, 2, **kw)
    S = (m.num_layers * (2 if m.bidirectional else 1), 4, 2)
    _gradcheck(m, torch.randn(5, 4, 3, dtype=F64), hx=(torch.randn(S, dtype=F64), torch.randn(S, dtype=F64)),
               lengths=torch.tensor([5, 2, 4, 1]))


@pytest.mark.parametrize("kw", [
    dict(zoneout=0.3),
    dict(recurrent_dropout=0.3),
    dict(zoneout=0.3, recurrent_dropout=0.2, layer_norm=True, bidirectional=True),
    dict(num_layers=3, dropout=0.4, zoneout=0.2),
], ids=str)
def test_gradcheck_masks_fixed_by_seed(kw):
    m = _module(3, 2, **kw).train()
    _gradcheck(m, torch.randn(4, 3, 3, dtype=F64), seed=11)


def test_gradcheck_zoneout_eval_uses_expectation():
    m = _module(3, 2, zoneout=0.4, layer_norm=True).eval()
    _gradcheck(m, torch.randn(4, 3, 3, dtype=F64))


# -- parity with torch.nn.LSTM ---------------------------------------------------------------
def _trained_lstm(D, H, dtype, **kw):
    """An nn.LSTM after a few Adam steps (weights no longer at their initial distribution)."""
    torch.manual_seed(0)
    ref = nn.LSTM(D, H, dtype=dtype, **kw)
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    for _ in range(5):
        x = torch.randn(6, 3, D, dtype=dtype)
        if kw.get("batch_first"):
            x = x.transpose(0, 1)
        y, _ = ref(x)
        loss = (y ** 2).mean() - y.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ref


def _twin(ref, **extra):
    """xlstm.torch.LSTM with ref's architecture and (load_state_dict) weights."""
    m = xt.LSTM(ref.input_size, ref.hidden_size, num_layers=ref.num_layers, bias=ref.bias,
                batch_first=ref.batch_first, dropout=ref.dropout, bidirectional=ref.bidirectional,
                dtype=ref.weight_ih_l0.dtype, device=ref.weight_ih_l0.device, **extra)
    m.load_state_dict(ref.state_dict())
    return m


def _outputs_and_grads(mod, x, hx, g, lengths=None):
    x = x.detach().clone().requires_grad_(True)
    hx = tuple(t.detach().clone().requires_grad_(True) for t in hx)
    if lengths is None:
        y, (h, c) = mod(x, hx)
    else:
        yp, (h, c) = mod(pack_padded_sequence(x, lengths, batch_first=mod.batch_first, enforce_sorted=False), hx)
        assert isinstance(yp, torch.nn.utils.rnn.PackedSequence)
        y = pad_packed_sequence(yp, batch_first=mod.batch_first, total_length=x.shape[1 if mod.batch_first else 0])[0]
    names = [n for n, _ in mod.named_parameters()]
    grads = torch.autograd.grad([y, h, c], [x, *hx, *mod.parameters()], g)
    out = {"output": y, "h_n": h, "c_n": c, "dx": grads[0], "dh0": grads[1], "dc0": grads[2]}
    out.update({"grad " + n: t for n, t in zip(names, grads[3:])})
    return out


def _parity(dtype, T=6, B=4, D=3, H=5, lengths=None, **kw):
    ref = _trained_lstm(D, H, dtype, **kw)
    m = _twin(ref)
    dirs = 2 if ref.bidirectional else 1
    torch.manual_seed(1)
    x = torch.randn((B, T, D) if ref.batch_first else (T, B, D), dtype=dtype)
    S = (ref.num_layers * dirs, B, H)
    hx = (0.5 * torch.randn(S, dtype=dtype), 0.5 * torch.randn(S, dtype=dtype))
    g = [torch.randn((B, T, dirs * H) if ref.batch_first else (T, B, dirs * H), dtype=dtype),
         torch.randn(S, dtype=dtype), torch.randn(S, dtype=dtype)]
    want = _outputs_and_grads(ref, x, hx, g, lengths)
    got = _outputs_and_grads(m, x, hx, g, lengths)
    assert want.keys() == got.keys() and len(want) == 6 + (4 if ref.bias else 2) * ref.num_layers * dirs
    return {k: scaled_error(got[k].detach().numpy(), want[k].detach().numpy()) for k in want}


PARITY = [
    dict(),
    dict(batch_first=True),
    dict(bidirectional=True),
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(bias=False),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("kw", PARITY, ids=str)
def test_parity_with_nn_lstm(kw, dtype):
    errs = _parity(dtype, **kw)
    assert max(errs.values()) <= TOL[dtype], errs


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True, bidirectional=True, num_layers=2)], ids=str)
def test_parity_with_nn_lstm_packed(kw, dtype):
    errs = _parity(dtype, lengths=torch.tensor([6, 2, 5, 1]), **kw)
    assert max(errs.values()) <= TOL[dtype], errs


def test_parity_eval_ignores_inter_layer_dropout():
    errs = _parity(F64, num_layers=2, dropout=0.5)   # _outputs_and_grads runs both in train mode...
    assert max(errs.values()) > 1e-3                 # ...where their (different) dropout masks differ
    ref = _trained_lstm(3, 4, F64, num_layers=2, dropout=0.5).eval()
    m = _twin(ref).eval()
    x = torch.randn(5, 2, 3, dtype=F64)
    assert scaled_error(m(x)[0].detach().numpy(), ref(x)[0].detach().numpy()) <= 1e-12


def test_inter_layer_dropout_is_nn_lstms():
    """Training with dropout=p: layer 2 reads layer 1's output times a 0 or 1/(1-p) mask, as
    nn.LSTM's; here composed from two one-layer nn.LSTMs and the mask from the same seed."""
    p, T, B, H = 0.4, 5, 3, 4
    ref = _trained_lstm(3, H, F64, num_layers=2, bidirectional=True)
    m = xt.LSTM(3, H, num_layers=2, bidirectional=True, dropout=p, dtype=F64)
    m.load_state_dict(ref.state_dict())
    l0, l1 = nn.LSTM(3, H, bidirectional=True, dtype=F64), nn.LSTM(2 * H, H, bidirectional=True, dtype=F64)
    sd = ref.state_dict()
    l0.load_state_dict({k: v for k, v in sd.items() if "_l0" in k})
    l1.load_state_dict({k.replace("_l1", "_l0"): v for k, v in sd.items() if "_l1" in k})
    x = torch.randn(T, B, 3, dtype=F64, requires_grad=True)
    torch.manual_seed(9)
    y, _ = m.train()(x)
    torch.manual_seed(9)                       # the one draw a layer boundary makes: [T,B,2H]
    mask = (torch.rand(T, B, 2 * H, dtype=F64) < 1 - p).to(F64) / (1 - p)
    assert (mask == 0).any() and (mask > 1).any()
    xr = x.detach().clone().requires_grad_(True)
    yr, _ = l1(l0(xr)[0] * mask)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    assert scaled_error(y.detach().numpy(), yr.detach().numpy()) <= 1e-12
    assert scaled_error(x.grad.numpy(), xr.grad.numpy()) <= 1e-12
    assert scaled_error(m.weight_ih_l0.grad.numpy(), l0.weight_ih_l0.grad.numpy()) <= 1e-12


def test_unbatched_input_as_nn_lstm():
    ref = _trained_lstm(3, 4, F64, bidirectional=True)
    m = _twin(ref)
    x = torch.randn(5, 3, dtype=F64)
    hx = (torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64))
    (y, (h, c)), (yr, (hr, cr)) = m(x, hx), ref(x, hx)
    assert y.shape == yr.shape == (5, 8) and h.shape == hr.shape == (2, 4)
    for a, b in ((y, yr), (h, hr), (c, cr)):
        assert scaled_error(a.detach().numpy(), b.detach().numpy()) <= 1e-12


@pytest.mark.parametrize("lengths,enforce_sorted", [([3, 5, 1, 4], False), ([5, 4, 4, 1], True)])
def test_packed_output_is_packed_as_nn_lstm_packs_it(lengths, enforce_sorted):
    ref = _trained_lstm(3, 4, F64, bidirectional=True)
    m = _twin(ref)
    p = pack_padded_sequence(torch.randn(5, 4, 3, dtype=F64), torch.tensor(lengths), enforce_sorted=enforce_sorted)
    (y, (h, _)), (yr, (hr, _)) = m(p), ref(p)
    assert torch.equal(y.batch_sizes, yr.batch_sizes)
    for a, b in ((y.sorted_indices, yr.sorted_indices), (y.unsorted_indices, yr.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert scaled_error(y.data.detach().numpy(), yr.data.detach().numpy()) <= 1e-12
    assert scaled_error(h.detach().numpy(), hr.detach().numpy()) <= 1e-12


# -- the LayerNorm cell and the masks are xlstm.LSTM's ----------------------------------------
def _core_twin(m):
    """An xlstm.LSTM holding m's weights (W = weight_ih^T, b = bias_ih + bias_hh)."""
    core = xlstm.LSTM(m.input_size, m.hidden_size, num_layers=m.num_layers, bidirectional=m.bidirectional,
                      layer_norm=m.layer_norm, forget_bias=m.forget_bias, dtype="float64",
                      zoneout=m.zoneout, recurrent_dropout=m.recurrent_dropout)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    state = {}
    for k in range(m.num_layers):
        for d in range(2 if m.bidirectional else 1):
            t, p = f"_l{k}" + ("_reverse" if d else ""), core.prefix(k, d)
            state[p + "W"], state[p + "U"] = sd["weight_ih" + t].T, sd["weight_hh" + t].T
            if m.layer_norm:
                for n in ("ln_gain", "ln_shift", "ln_c_gain", "ln_c_shift"):
                    state[p + n] = sd[n + t]
            else:
                state[p + "b"] = sd["bias_ih" + t] + sd["bias_hh" + t]
    core.load_state_dict(state)
    return core


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_layer_norm_zoneout_matches_xlstm_lstm(train):
    """Same function and gradients as xlstm.LSTM given the masks xlstm.torch drew (last_masks)."""
    m = _module(3, 4, layer_norm=True, zoneout=0.25, recurrent_dropout=0.2, bidirectional=True, num_layers=2)
    m.train(train)
    core = _core_twin(m).train(train)
    x = torch.randn(6, 2, 3, dtype=F64, requires_grad=True)
    seen = {}
    orig = xlstm.LSTM.forward

    def spy(self, x, state=None, lengths=None, masks=None, **kw):
        y = orig(self, x, state, lengths, masks, **kw)
        seen[len(seen)] = self.last_masks[(0, 0)], self.last_masks[(0, 1)]
        return y

    mp = pytest.MonkeyPatch()
    mp.setattr(xlstm.LSTM, "forward", spy)
    try:
        y, (h, c) = m(x)
    finally:
        mp.undo()
    g = torch.randn_like(y)
    (y * g).sum().backward()
    cm = {(k, d): seen[k][d] for k in seen for d in (0, 1)}
    yc, (hc, cc) = core.forward(x.detach().numpy(), masks=cm)
    dx, _ = core.backward(g.numpy())
    np.testing.assert_allclose(y.detach().numpy(), yc, rtol=0, atol=1e-14)
    np.testing.assert_allclose(c.detach().numpy(), cc, rtol=0, atol=1e-14)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=0, atol=1e-13)
    np.testing.assert_allclose(m.ln_gain_l1_reverse.grad.numpy(), core.grads["l1_reverse.ln_gain"], rtol=0, atol=1e-13)
    np.testing.assert_allclose(m.weight_hh_l0.grad.numpy(), core.grads["l0.U"].T, rtol=0, atol=1e-13)
    if train:   # zoneout masks are 0/1 draws; in eval every entry is the expectation 0.25
        assert set(np.unique(cm[(0, 0)][0])) == {0.0, 1.0}
    else:
        assert np.all(cm[(0, 0)][0] == 0.25) and cm[(0, 0)][2] is None


# -- training, saving, seeding, memory sharing ------------------------------------------------
def test_language_model_trains_with_adam():
    torch.manual_seed(0)
    V, T, B = 12, 16, 8
    emb = nn.Embedding(V, 16)
    lstm = xt.LSTM(16, 32, batch_first=True, layer_norm=True, zoneout=0.1, recurrent_dropout=0.1)
    head = nn.Linear(32, V)
    model = nn.ModuleList([emb, lstm, head])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seq = torch.arange(T + 1) % 5 + torch.randint(0, 2, (B, 1)) * 5    # two periodic patterns
    losses = []
    for _ in range(60):
        out, _ = lstm(emb(seq[:, :-1]))
        loss = nn.functional.cross_entropy(head(out).reshape(-1, V), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_save_load_round_trip(tmp_path):
    m = _module(3, 4, layer_norm=True, zoneout=0.2, num_layers=2).eval()
    x = torch.randn(5, 2, 3, dtype=F64)
    y = m(x)[0]
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    torch.save(m, tmp_path / "m.pt")
    m2 = xt.LSTM(3, 4, layer_norm=True, zoneout=0.2, num_layers=2, dtype=F64).eval()
    m2.load_state_dict(torch.load(tmp_path / "sd.pt"))
    m3 = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(m2(x)[0], y) and torch.equal(m3(x)[0], y)
    assert sorted(m.state_dict()) == sorted(
        f"{n}_l{k}{r}" for k in range(2) for r in ("", ) for n in ("weight_ih", "weight_hh", "ln_gain", "ln_shift",
                                                                     "ln_c_gain", "ln_c_shift"))


def test_manual_seed_reproduces_masks_and_gradients():
    def run(seed):
        m = _module(3, 4, num_layers=2, dropout=0.3, zoneout=0.2, recurrent_dropout=0.2, bidirectional=True)
        x = torch.randn(5, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        torch.manual_seed(seed)
        y, _ = m(x)
        y.sum().backward()
        return y.detach(), x.grad
    (y1, g1), (y2, g2), (y3, _) = run(5), run(5), run(6)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)
    assert not torch.equal(y1, y3)


def test_activations_are_not_copied_between_torch_and_numpy(monkeypatch):
    """The input, output, states, dy, dx and weight gradients the core sees are the tensors' own memory."""
    seen = {}
    fwd, bwd = xlstm.LSTM.forward, xlstm.LSTM.backward

    def ptr(a):
        return a.__array_interface__["data"][0]

    def spy_forward(self, x, state=None, lengths=None, masks=None, **kw):
        y, (h, c) = fwd(self, x, state, lengths, masks, **kw)
        seen.update(x=ptr(x), h0=ptr(state[0]), y=ptr(y), h_n=ptr(h))
        return y, (h, c)

    def spy_backward(self, dy, dstate=None, **kw):
        dx, (dh0, dc0) = bwd(self, dy, dstate, **kw)
        seen.update(dy=ptr(dy), dx=ptr(dx), dh0=ptr(dh0), dW=ptr(self.grads["l0.W"]), dU=ptr(self.grads["l0.U"]))
        return dx, (dh0, dc0)

    monkeypatch.setattr(xlstm.LSTM, "forward", spy_forward)
    monkeypatch.setattr(xlstm.LSTM, "backward", spy_backward)
    m = _module(3, 4)
    x = torch.randn(6, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, 2, 4, dtype=F64, requires_grad=True)
    y, (h, c) = m(x, (h0, torch.zeros_like(h0)))
    got = {}
    x.register_hook(lambda g: got.update(dx=g.data_ptr()))
    h0.register_hook(lambda g: got.update(dh0=g.data_ptr()))
    dy = torch.randn_like(y)
    torch.autograd.backward([y], [dy])
    assert seen["x"] == x.data_ptr() and seen["h0"] == h0.data_ptr()
    assert seen["y"] == y.data_ptr() and seen["h_n"] == h.data_ptr()
    assert seen["dy"] == dy.data_ptr()
    assert seen["dx"] == got["dx"] and seen["dh0"] == got["dh0"]
    # the weight gradients xlstm accumulated become .grad as they are
    assert seen["dW"] == m.weight_ih_l0.grad.data_ptr() and seen["dU"] == m.weight_hh_l0.grad.data_ptr()


def test_non_contiguous_input_is_handled():
    m = _module(3, 4)
    x = torch.randn(2, 6, 3, dtype=F64)
    xt_ = x.transpose(0, 1)                        # [T,B,D] view, not contiguous
    assert not xt_.is_contiguous()
    y1, (h1, _) = m(xt_)
    y2, (h2, _) = m(xt_.contiguous())
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


def test_module_follows_double_float_and_train_eval():
    m = xt.LSTM(3, 4, zoneout=0.5)
    assert m.weight_ih_l0.dtype == F32 and m.weight_ih_l0.shape == (16, 3)
    x = torch.randn(5, 2, 3)
    assert m(x)[0].dtype == F32
    m.double()
    x = x.double()
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])           # evaluation: no random masks
    m.train()
    torch.manual_seed(0)
    a = m(x)[0]
    assert not torch.equal(a, m(x)[0])             # training: fresh zoneout masks each call


def test_double_backward_is_refused():
    m = _module(3, 4)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    y, _ = m(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_retain_graph_second_backward_gives_the_same_gradients():
    """The first backward frees the activations; the second reruns the forward with the same masks."""
    m = _module(3, 4, zoneout=0.3, recurrent_dropout=0.3, num_layers=2, dropout=0.3).train()
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    y, (h, c) = m(x)
    loss = y.square().sum() + c.sum()
    g1 = torch.autograd.grad(loss, [x, *m.parameters()], retain_graph=True)
    g2 = torch.autograd.grad(loss, [x, *m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_weights_changed_in_place_before_backward_are_refused():
    m = _module(3, 4)
    y, _ = m(torch.randn(5, 2, 3, dtype=F64))
    with torch.no_grad():
        m.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# -- errors a torch user can act on ---------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    (lambda m: m(torch.randn(2, 5, 2, 3, dtype=F64)), "3-D"),
    (lambda m: m(torch.randn(5, 2, 7, dtype=F64)), "input_size=3"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=F32)), "dtype torch.float32 but the LSTM's weights are torch.float64"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=F64, device="meta")), "on meta but the LSTM's weights are on cpu"),
    (lambda m: m(torch.randn(0, 2, 3, dtype=F64)), "at least 1"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=F64), torch.zeros(1, 2, 4, dtype=F64)), "tuple"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=F64), (torch.zeros(1, 3, 4, dtype=F64),) * 2), r"expected \(1, 2, 4\)"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=F64), (torch.zeros(1, 2, 4),) * 2), "h_0 is torch.float32"),
    (lambda m: m.half()(torch.randn(5, 2, 3).half()), r"float32 or float64.*\.float\(\)"),
    (lambda m: m(np.zeros((5, 2, 3))), "torch.Tensor or a PackedSequence"),
])
def test_errors_say_what_to_do(make, match):
    with pytest.raises(InputError, match=match):
        make(_module(3, 4))


def test_cuda_tensor_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setattr(xlstm.backends, "cupy_unavailable_reason", lambda: "no CUDA driver found")
    with pytest.raises(InputError, match=r"no CUDA driver found.*'xlstm-bptt\[cuda12\]'.*'xlstm-bptt\[cuda13\]'"):
        xt._bridge(torch.device("cuda", 0))


@pytest.mark.parametrize("kw,match", [
    (dict(layer_norm=True, bias=False), "ln_shift"),
    (dict(dropout=1.0), "dropout must be a probability"),
    (dict(zoneout=-0.1), "zoneout must be a probability"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
])
def test_bad_construction(kw, match):
    with pytest.raises(InputError, match=match):
        xt.LSTM(3, 4, **kw)


def test_changing_forget_bias_between_calls_takes_effect():
    torch.manual_seed(0)
    m = xt.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        y0, _ = m(x)
        m.forget_bias = 1.0
        y1, _ = m(x)
        fresh = xt.LSTM(3, 4, forget_bias=1.0, dtype=torch.float64)
        fresh.load_state_dict(m.state_dict())
        want, _ = fresh(x)
    assert not torch.equal(y1, y0) and torch.equal(y1, want)


def test_bench_torch_module_checks_then_times_both(tmp_path):
    r = xlstm_cli("bench", "--torch-module", "--hidden", "8,16", "--seq-len", "5", "--batch", "3", "--repeat", "2",
                  "--rounds", "1", "--settle", "0", "--out", tmp_path, "--name", "tm", check=0)
    assert "xlstm.torch ms" in r.stdout and "nn.LSTM ms" in r.stdout
    rows = json.load(open(tmp_path / "tm.json"))["rows"]
    assert [(row["H"], row["T"], row["B"]) for row in rows] == [(8, 5, 3), (16, 5, 3)]
    for row in rows:
        assert row["max_error"] <= 1e-5 and row["device"] == "cpu"
        assert row["xlstm.torch_ms"] > 0 and row["nn.LSTM_ms"] > 0 and row["xlstm.LSTM_ms"] > 0
        assert row["status"] == "ok" and row["step_over_torch"] == row["xlstm.torch/nn.LSTM"]   # the report's keys
    assert json.load(open(tmp_path / "tm.json"))["meta"]["partial"] is False


def test_bench_torch_module_stops_at_its_budget_and_keeps_what_it_measured(tmp_path):
    xlstm_cli("bench", "--torch-module", "--hidden", "8,16", "--seq-len", "5", "--batch", "3", "--repeat", "2",
              "--rounds", "1", "--settle", "0", "--budget", "0", "--out", tmp_path, "--name", "tm", check=0)
    res = json.load(open(tmp_path / "tm.json"))
    assert res["rows"] == [] and res["meta"]["partial"] is True


# -- CUDA: the same parity on CUDA tensors, on a non-default torch stream ----------------------
@pytest.fixture
def exact_cuda(monkeypatch):
    """A CUDA device with torch's TF32 off (cuDNN's float32 RNN would otherwise round the GEMM
    operands to TF32), or a skip."""
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device here")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_cuda_parity_with_nn_lstm_on_a_side_stream(kw, dtype, packed, exact_cuda):
    ref = _trained_lstm(3, 5, dtype, **kw).cuda()
    m = _twin(ref)
    assert m.weight_ih_l0.is_cuda
    dirs = 2 if ref.bidirectional else 1
    T, B = 6, 4
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((B, T, 3) if ref.batch_first else (T, B, 3), dtype=dtype, generator=gen).cuda()
    S = (ref.num_layers * dirs, B, 5)
    hx = tuple(0.5 * torch.randn(S, dtype=dtype, generator=gen).cuda() for _ in range(2))
    g = [torch.randn(t, dtype=dtype, generator=gen).cuda()
         for t in ((B, T, dirs * 5) if ref.batch_first else (T, B, dirs * 5), S, S)]
    lengths = torch.tensor([6, 2, 5, 1]) if packed else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                # xlstm's kernels must queue on this stream
        got = _outputs_and_grads(m, x, hx, g, lengths)
        want = _outputs_and_grads(ref, x, hx, g, lengths)
        got = {k: v.detach().cpu() for k, v in got.items()}   # copies ordered on the side stream
        want = {k: v.detach().cpu() for k, v in want.items()}
    errs = {k: scaled_error(got[k].numpy(), want[k].numpy()) for k in want}
    # cuDNN's float64 sums in another order than NumPy's; 1e-12 of the largest entry holds there too
    assert max(errs.values()) <= TOL[dtype], errs


@pytest.mark.gpu
def test_cuda_training_step_matches_cpu(exact_cuda):
    """The CUDA path of the LayerNorm cell with zoneout (evaluation: the expectation, no random
    draw) gives the CPU path's output and gradients, on a side stream."""
    kw = dict(layer_norm=True, num_layers=2, bidirectional=True, zoneout=0.3)
    m = _module(3, 4, **kw).eval()
    mc = _module(3, 4, **kw).eval().cuda()
    mc.load_state_dict(m.state_dict())
    x = torch.randn(6, 2, 3, dtype=F64)
    y, _ = m(x)
    y.square().sum().backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())   # mc's weights were copied on the default stream
    with torch.cuda.stream(side):
        yc, _ = mc(x.cuda())
        yc.square().sum().backward()
        yc = yc.cpu()
        grads = {n: p.grad.cpu() for n, p in mc.named_parameters()}
    assert scaled_error(yc.detach().numpy(), y.detach().numpy()) <= 1e-12
    for n, p in m.named_parameters():
        assert scaled_error(grads[n].numpy(), p.grad.numpy()) <= 1e-12, n


def test_backward_frees_the_activations(monkeypatch):
    """Like torch's saved tensors, the cores' activations go at the backward, not with the graph."""
    freed = []
    orig = xlstm.LSTM.release_cache
    monkeypatch.setattr(xlstm.LSTM, "release_cache", lambda self: (freed.append(self), orig(self)))
    m = _module(3, 4, num_layers=2)
    y, _ = m(torch.randn(5, 2, 3, dtype=F64, requires_grad=True))
    assert freed == []                             # kept for the backward
    y.sum().backward()
    assert len(freed) == 2                         # one core per layer
    with torch.no_grad():
        m(torch.randn(5, 2, 3, dtype=F64))
    assert len(freed) == 4                         # nothing to keep without a graph


# -- the CuPy side of the bridge, on the stand-in cupy (host-built kernels, no GPU) ------------
def _standin_bridge(fake):
    """xlstm.torch's CUDA bridge with the stand-in cupy's arrays (views of the CPU tensors) in
    place of DLPack views and streams: what runs is the wrapper's CuPy-backend path (contiguous
    W and U copies, gradient layouts, unread checks) on xlstm's CupyBackend."""
    Dev = type(fake.module.zeros(1))

    class Standin(xt._Cuda):
        def __init__(self, device):
            self.device = device

        def context(self):
            import contextlib
            return contextlib.nullcontext()

        def to_xp(self, t):
            return t.detach().numpy().view(Dev)

        @staticmethod
        def from_xp(a):
            return torch.from_numpy(a.view(np.ndarray))

    return Standin


@pytest.mark.parametrize("kw", [dict(num_layers=2, bidirectional=True),
                                dict(layer_norm=True, zoneout=0.3, recurrent_dropout=0.2, num_layers=2, dropout=0.3)],
                         ids=["plain", "layer_norm-masks"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_cupy_backend_path_matches_numpy_and_never_syncs(kw, graphs, host_lib, monkeypatch):
    from support.standin import install_fakes

    m = _module(3, 4, **kw)
    x = torch.randn(6, 2, 3, dtype=F64)
    S = (m.num_layers * m._dirs, 2, 4)
    hx = (torch.randn(S, dtype=F64), torch.randn(S, dtype=F64))
    g = [torch.randn(6, 2, 4 * m._dirs, dtype=F64), torch.randn(S, dtype=F64), torch.randn(S, dtype=F64)]
    torch.manual_seed(2)
    want = _outputs_and_grads(m, x, hx, g)                       # NumPy backend
    fake = install_fakes(host_lib, monkeypatch, nvmath=graphs, counting=True)
    monkeypatch.setattr(xt, "_bridge", _standin_bridge(fake))
    torch.manual_seed(2)                                           # the same masks
    fake.counts.reset()
    got = _outputs_and_grads(m, x, hx, g)                         # CupyBackend on the stand-in
    assert fake.counts.total_syncs() == 0, dict(fake.counts.sync_sites)
    assert fake.counts.total_ops() > 0                            # it did run on the "device"
    assert xlstm.backends._cupy_backend().graphs_active() == graphs
    errs = {k: scaled_error(got[k].detach().numpy(), want[k].detach().numpy()) for k in want}
    assert max(errs.values()) <= 1e-12, errs
    xbad = x.clone()
    xbad[1, 0, 2] = float("nan")                                  # unread on the device: NaN flows
    assert torch.isnan(m(xbad)[0]).any()


@pytest.mark.gpu
def test_cuda_step_issues_no_torch_sync(exact_cuda):
    """torch's sync debug mode raises on any torch operation that waits for the device; the
    CuPy side queues on torch's stream and leaves its input checks unread."""
    m = xt.LSTM(8, 16, num_layers=2, zoneout=0.1, dropout=0.2, device="cuda")
    x = torch.randn(10, 4, 8, device="cuda", requires_grad=True)
    y, _ = m(x)                                      # first call: CuPy compiles its kernels
    y.sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, (h, c) = m(x)
        (y.sum() + c.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad).all()
