"""Traces: every named intermediate of forward and BPTT, per layer, direction and time step.

    y, _ = lstm.forward(x, trace=True)          # a new trace in lstm.last_trace
    dx, _ = lstm.backward(dy, trace=True)       # adds the backward names to it
    print(lstm.last_trace)                      # a readable table, one block per step
    with xlstm.trace.record(lstm) as tr: ...    # or trace every forward/backward in a block
    tr["l0/fw/t2/dCt"]; tr.save("run.npz"); Trace.load("run.npz")

Names (arrays [B,...] of step t; B rows):
  forward  x [B,D], z [B,4H] (raw pre-activations x@W + h_prev@U (+ b)), i, f, g, o, c, h [B,H]
           (g before dropout; c, h the carried state after mask/zoneout). With layer_norm also
           zn [B,4H] = LN(z) per gate, c_new (f*c_prev + i*g, before LN) and cn = LN(c_new).
  backward (the seed article's names) dHt = mask*dy + dh_next (total gradient into h_t),
           dOt, dCt (w.r.t. c_new), dCprojt, dFt, dIt [B,H]; dz [B,4H]; dHX = dz @ [W;U]^T
           [B,D+H]; dh_next, dc_next [B,H]: what this step sends to step t-1 (dh_next =
           dHX[:, D:] + the part that skips the cell). With layer_norm also dCnorm (w.r.t. cn)
           and dzn (w.r.t. LN(z)).
Directions are ``fw`` and ``bw``; t counts steps in the order the direction processes them
(for ``bw``, t=0 is the last valid position of each sequence).

How: the fast path runs unchanged; after each layer/direction the tracer recomputes every step
from what the fast path stored, with the readable references (``xlstm/cell.py`` for the plain
cell, ``xlstm.layernorm.ln_cell_*`` for the LayerNorm cell), and records how far the fast path
is from them (``trace.mismatch``; ``trace.check()`` raises above a tolerance). When the
tracer is off (``lstm.tracer is None``) nothing of this runs.
"""
from __future__ import annotations

import contextlib
import json

import numpy as np

from . import cell
from .errors import InputError
from .gates import split
from .gradcheck import scaled_error
from .layernorm import ln_cell_backward, ln_cell_forward

FORWARD_NAMES = ("x", "z", "zn", "i", "f", "g", "o", "c_new", "cn", "c", "h")
BACKWARD_NAMES = ("dHt", "dOt", "dCnorm", "dCt", "dCprojt", "dFt", "dIt", "dzn", "dz", "dHX",
                  "dh_next", "dc_next")
DIRS = ("fw", "bw")


class Trace:
    """Named intermediates by (layer, direction, step); see the module doc for the names."""

    def __init__(self, title: str = ""):
        self.title = title
        self.steps: dict = {}          # (layer, dir, t) -> {name: np.ndarray}
        self.mismatch: dict = {}       # "l0/fw/forward" -> max scaled error, fast path vs reference

    # -- recording (called by LSTM when lstm.tracer is this trace) --------------------------------
    def _step(self, k, d, t):
        return self.steps.setdefault((k, d, t), {})

    def _note(self, key, a, b):
        # relative to the tensor's largest entry; the floor keeps rounding noise in tensors that
        # are zero in exact arithmetic (e.g. layer norm's gradient with H=2) from counting
        self.mismatch[key] = max(self.mismatch.get(key, 0.0), scaled_error(a, b, floor=1e-8))

    @staticmethod
    def _inputs(lstm, k, d):
        """Parameters as NumPy: W, U, b (None for layer norm), the LN params (None for plain)."""
        be, p = lstm.backend, lstm.prefix(k, d)
        P = {n: be.to_numpy(v) for n, v in lstm.params.items() if n.startswith(p)}
        ln = None
        if lstm.layer_norm:
            ln = tuple(P[p + n] for n in ("ln_gain", "ln_shift", "ln_c_gain", "ln_c_shift"))
        return P[p + "W"], P[p + "U"], P.get(p + "b"), ln

    @staticmethod
    def _step_args(be, step_mask, masks, t):
        zc, zh, gm = masks
        return [None if a is None else be.to_numpy(a[t]) for a in (step_mask, zc, zh, gm)]

    def _reference_forward(self, lstm, k, d, x, hs, cs, step_mask, masks, t):
        """Step t recomputed from the stored h_{t-1}, c_{t-1}: (named values, ref dict or gates)."""
        W, U, b, ln = self._inputs(lstm, k, d)
        mask, zc, zh, gm = self._step_args(lstm.backend, step_mask, masks, t)
        z = x[t] @ W + hs[t] @ U
        if ln is None:
            gates, c, h = cell.pointwise_forward(z + b, cs[t], hs[t], lstm.forget_bias, mask, zc, zh, gm)
            named = dict(x=x[t], z=z + b)
            ref = dict(gates=gates, c=c, h=h)
        else:
            ref = ln_cell_forward(z, cs[t], hs[t], *ln, lstm.forget_bias, lstm.layer_norm_eps, mask, zc, zh, gm)
            gates, c, h = ref["gates"], ref["c"], ref["h"]
            named = dict(x=x[t], z=z, zn=ref["zn"])
        i, f, g, o = split(gates, lstm.hidden_size)
        named.update(i=i, f=f, g=g, o=o)
        if ln is not None:
            named.update(c_new=ref["c_new"], cn=ref["cn"])
        named.update(c=c, h=h)
        return named, ref

    def record_forward(self, lstm, k, d, x2, gates, hs, cs, step_mask, masks, extra):
        """After the fast forward of layer k, direction d: recompute and record every step."""
        be = lstm.backend
        hs, cs, gates = be.to_numpy(hs), be.to_numpy(cs), be.to_numpy(gates)
        T, B = gates.shape[:2]
        x = be.to_numpy(x2).reshape(T, B, -1)
        key = f"l{k}/{DIRS[d]}/forward"
        for t in range(T):
            named, ref = self._reference_forward(lstm, k, d, x, hs, cs, step_mask, masks, t)
            self._step(k, d, t).update({n: np.array(v) for n, v in named.items()})
            self._note(key, gates[t], ref["gates"])
            self._note(key, cs[t + 1], ref["c"])
            self._note(key, hs[t + 1], ref["h"])
            if extra is not None:
                self._note(key, be.to_numpy(extra["zhat"][t]), ref["zhat"])
                self._note(key, be.to_numpy(extra["chat"][t]), ref["chat"])

    def record_backward(self, lstm, k, d, cache, dy, dh_n, dc_n, dz, dh0, dc0):
        """After the fast BPTT of layer k, direction d: rerun BPTT with the reference cell,
        record every step's gradients and compare dz per step and dh0, dc0 with the fast path."""
        be = lstm.backend
        hs, cs, gates = (be.to_numpy(cache[n]) for n in ("hs", "cs", "gates"))
        T, B, H = cs.shape[0] - 1, cs.shape[1], lstm.hidden_size
        x = be.to_numpy(cache["x2"]).reshape(T, B, -1)
        dy, dz = be.to_numpy(dy), be.to_numpy(dz)
        step_mask, masks = lstm._cache["step_mask"], cache["masks"]
        W, U, _, ln = self._inputs(lstm, k, d)
        WU = np.concatenate([W, U], axis=0)              # TensorFlow's kernel layout [D+H, 4H]
        D = W.shape[0]
        dh_next = np.zeros((B, H), lstm.dtype) if dh_n is None else be.to_numpy(dh_n).copy()
        dc_next = np.zeros((B, H), lstm.dtype) if dc_n is None else be.to_numpy(dc_n).copy()
        key = f"l{k}/{DIRS[d]}/backward"
        for t in reversed(range(T)):
            mask, zc, zh, gm = self._step_args(be, step_mask, masks, t)
            _, ref = self._reference_forward(lstm, k, d, x, hs, cs, step_mask, masks, t)
            if ln is None:
                r = cell.pointwise_backward_named(gates[t], cs[t], dy[t], dh_next, dc_next, mask, zc, zh, gm)
            else:
                r = ln_cell_backward(ref, cs[t], ln[0], ln[2], dy[t], dh_next, dc_next, mask, zc, zh, gm)
            dHX = r["dz"] @ WU.T
            dh_next = dHX[:, D:] + r["dh_skip"]
            dc_next = r["dc_prev"]
            named = {n: r[n] for n in BACKWARD_NAMES if n in r}
            named.update(dHX=dHX, dh_next=dh_next, dc_next=dc_next)
            self._step(k, d, t).update({n: np.array(v) for n, v in named.items()})
            self._note(key, dz[t], r["dz"])
        self._note(key, be.to_numpy(dh0), dh_next)
        self._note(key, be.to_numpy(dc0), dc_next)

    # -- reading ----------------------------------------------------------------------------
    @property
    def max_mismatch(self) -> float:
        """Largest scaled difference between the fast path and the reference over the trace."""
        return max(self.mismatch.values(), default=0.0)

    def check(self, tol: float = 1e-6) -> "Trace":
        """Raise AssertionError when the fast path and the reference differ by more than tol."""
        bad = {k: v for k, v in self.mismatch.items() if v > tol}
        if bad:
            raise AssertionError(f"fast path differs from the reference cell: {bad}")
        return self

    def keys(self):
        """All keys 'l{layer}/{fw|bw}/t{step}/{name}', in recording order."""
        return [f"l{k}/{DIRS[d]}/t{t}/{n}" for (k, d, t), v in sorted(self.steps.items()) for n in v]

    def __getitem__(self, key: str):
        try:
            l, dr, t, name = key.split("/")
            return self.steps[(int(l[1:]), DIRS.index(dr), int(t[1:]))][name]
        except (ValueError, KeyError):
            raise KeyError(f"{key!r} is not in this trace (keys look like 'l0/fw/t0/dCt')") from None

    def __contains__(self, key) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __len__(self) -> int:
        return sum(len(v) for v in self.steps.values())

    def save(self, path) -> None:
        """Write a .npz with one array per key 'l0/fw/t3/dCt' (plus the title and mismatches)."""
        arrays = {key: self[key] for key in self.keys()}
        meta = json.dumps(dict(title=self.title, mismatch=self.mismatch))
        np.savez(path, __meta__=np.array(meta), **arrays)

    @classmethod
    def load(cls, path) -> "Trace":
        """A Trace read back from ``save``'s .npz."""
        tr = cls()
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                if key == "__meta__":
                    meta = json.loads(str(f[key]))
                    tr.title, tr.mismatch = meta["title"], meta["mismatch"]
                    continue
                l, dr, t, name = key.split("/")
                tr._step(int(l[1:]), DIRS.index(dr), int(t[1:]))[name] = f[key]
        return tr

    def format(self, precision: int = 4, max_items: int = 12) -> str:
        """The table that ``print(trace)`` shows: per step, one row per name."""
        def fmt(a):
            a = np.asarray(a)
            if a.ndim == 2 and a.shape[0] == 1:     # batch of one: show the row
                a = a[0]
            s = np.array2string(a, precision=precision, suppress_small=True, separator=" ",
                                threshold=max_items, edgeitems=max(1, max_items // 2), max_line_width=10 ** 6)
            return " ".join(s.split())
        out = [f"xlstm trace: {self.title}" if self.title else "xlstm trace",
               f"fast path vs reference cell, max scaled difference: {self.max_mismatch:.2e}"]
        last = None
        for (k, d, t), named in sorted(self.steps.items()):
            if (k, d) != last:
                out.append(f"\n== layer {k}, direction {DIRS[d]} ==")
                last = (k, d)
            out.append(f"t={t}")
            order = [n for n in FORWARD_NAMES + BACKWARD_NAMES if n in named]
            order += [n for n in named if n not in order]
            width = max(len(n) for n in order)
            for n in order:
                shape = "x".join(map(str, named[n].shape))
                out.append(f"  {n:<{width}}  [{shape:>5}]  {fmt(named[n])}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"<Trace {self.title!r}: {len(self.steps)} steps, {len(self)} arrays>"


def _title(lstm) -> str:
    return repr(lstm)


@contextlib.contextmanager
def record(lstm):
    """Trace every forward/backward of ``lstm`` inside the block; yields the Trace."""
    tr = Trace(_title(lstm))
    prev, lstm.tracer = lstm.tracer, tr
    try:
        with lstm.backend.eager():     # the per-step loop, whose ops the trace checks (no graphs)
            yield tr
    finally:
        lstm.tracer = prev
        lstm.last_trace = tr


def traced_call(lstm, which: str, *args):
    """lstm.forward/backward(*args) with a tracer on (what ``trace=True`` does).

    forward starts a new ``lstm.last_trace``; backward adds to the existing one (or starts one).
    """
    if which not in ("forward", "backward"):
        raise InputError(f"traced_call: which must be 'forward' or 'backward', got {which!r}")
    tr = getattr(lstm, "last_trace", None)
    if which == "forward" or not isinstance(tr, Trace):
        tr = Trace(_title(lstm))
    prev, lstm.tracer = lstm.tracer, tr
    try:
        with lstm.backend.eager():     # the per-step loop, whose ops the trace checks (no graphs)
            out = getattr(lstm, which)(*args)
    finally:
        lstm.tracer = prev
    lstm.last_trace = tr
    return out
