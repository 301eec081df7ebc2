"""Parity with torch.nn.LSTM: outputs, final states, dx, dh0, dc0 and every parameter gradient.

torch is an independent implementation (its own CPU kernels and autograd), so agreement to
1e-9 relative in float64 checks our forward and BPTT end to end.
"""
import numpy as np
import pytest

import xlstm
from xlstm.gradcheck import rel_error, scaled_error

torch = pytest.importorskip("torch", reason="torch is not installed; parity tests need it (pip install torch)")


def _run_both(T, B, D, H, layers, bidir, dtype, lengths=None, seed=0, metric=rel_error):
    tdtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(D, H, num_layers=layers, bidirectional=bidir).to(tdtype)
    ours = xlstm.interop.from_torch(ref)
    assert ours.dtype.name == dtype
    rng = np.random.default_rng(seed)
    dirs = 2 if bidir else 1
    x = rng.standard_normal((T, B, D)).astype(dtype)
    h0 = rng.standard_normal((layers * dirs, B, H)).astype(dtype) * 0.5
    c0 = rng.standard_normal((layers * dirs, B, H)).astype(dtype) * 0.5
    dy = rng.standard_normal((T, B, H * dirs)).astype(dtype)
    dhn = rng.standard_normal((layers * dirs, B, H)).astype(dtype)
    dcn = rng.standard_normal((layers * dirs, B, H)).astype(dtype)
    if lengths is not None:
        Lm = (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[:, :, None]
        dy = dy * Lm                       # torch's padded output ignores gradient at padding

    y, (hn, cn) = ours.forward(x, (h0, c0), lengths=lengths)
    dx, (dh0, dc0) = ours.backward(dy, (dhn, dcn))

    xt = torch.tensor(x, requires_grad=True)
    h0t, c0t = torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)
    if lengths is None:
        yt, (hnt, cnt) = ref(xt, (h0t, c0t))
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths), enforce_sorted=False)
        yp, (hnt, cnt) = ref(packed, (h0t, c0t))
        yt, _ = torch.nn.utils.rnn.pad_packed_sequence(yp, total_length=T)
    loss = (yt * torch.tensor(dy)).sum() + (hnt * torch.tensor(dhn)).sum() + (cnt * torch.tensor(dcn)).sum()
    loss.backward()
    pairs = {"y": (y, yt), "h_n": (hn, hnt), "c_n": (cn, cnt), "dx": (dx, xt.grad),
             "dh0": (dh0, h0t.grad), "dc0": (dc0, c0t.grad)}
    tgrads = {k: v.grad.numpy() for k, v in ref.named_parameters()}
    for k, v in xlstm.interop.to_torch_state_dict(ours, grads=True).items():
        pairs["grad " + k] = (v, tgrads[k])
    return {k: metric(np.asarray(a), b.detach().numpy() if hasattr(b, "detach") else b)
            for k, (a, b) in pairs.items()}


CONFIGS = [  # T, B, D, H, layers, bidirectional
    (1, 1, 3, 5, 1, False),
    (7, 4, 3, 5, 1, False),
    (6, 3, 5, 4, 2, False),
    (5, 2, 4, 3, 3, False),
    (6, 3, 4, 5, 1, True),
    (5, 3, 3, 4, 2, True),
    (4, 2, 3, 3, 3, True),
]


@pytest.mark.parametrize("T,B,D,H,layers,bidir", CONFIGS)
def test_parity_float64(T, B, D, H, layers, bidir):
    errs = _run_both(T, B, D, H, layers, bidir, "float64")
    assert max(errs.values()) < 1e-9, errs


@pytest.mark.parametrize("T,B,D,H,layers,bidir", CONFIGS)
def test_parity_float32(T, B, D, H, layers, bidir):
    # float32 rounding is ~6e-8 relative per op; entries near zero make elementwise relative
    # error meaningless, so compare each tensor relative to its largest entry
    errs = _run_both(T, B, D, H, layers, bidir, "float32", metric=scaled_error)
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("layers,bidir", [(1, False), (2, False), (3, False), (1, True), (2, True), (3, True)])
def test_parity_uneven_lengths_float64(layers, bidir):
    errs = _run_both(6, 4, 3, 4, layers, bidir, "float64", lengths=[6, 2, 5, 1])
    assert max(errs.values()) < 1e-9, errs


@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)])
def test_to_torch_state_dict_round_trip_keeps_forget_bias(layers, bidir):
    """A model with TensorFlow's forget_bias=1 exported to torch computes the same function."""
    ours = xlstm.LSTM(3, 4, num_layers=layers, bidirectional=bidir, forget_bias=1.0, dtype="float64", seed=5)
    ref = torch.nn.LSTM(3, 4, num_layers=layers, bidirectional=bidir).double()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in xlstm.interop.to_torch_state_dict(ours).items()})
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    y, (h, c) = ours.forward(x)
    yt, (ht, ct) = ref(torch.from_numpy(x))
    assert rel_error(y, yt.detach().numpy()) < 1e-12 and rel_error(c, ct.detach().numpy()) < 1e-12
    back = xlstm.interop.from_torch(ref)
    assert back.forget_bias == 0.0
    np.testing.assert_allclose(back.forward(x)[0], y, rtol=1e-12)
