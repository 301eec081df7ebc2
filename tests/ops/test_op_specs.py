"""The ops' declared specs against what they describe: the kernels' parameter lists in the .cu
sources, the implementations' signatures, and what the reference loops really read and write."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from support.kernels_host import kernel_signatures
from xlstm import ops
from xlstm.backends import cuda_graphs
from xlstm.kernels import SOURCES, kernel_source
from xlstm.ops import entry_names
from xlstm.ops.spec import Arg, Scalar

# what the persistent launcher appends after the spec'd parameters (cupy_backend.launch_persistent)
PERSISTENT_TAIL = ("barrier", "T", "B", "H", "KS")


@pytest.mark.parametrize("source", SOURCES)
def test_declared_entry_points_are_exactly_the_sources_kernels(source):
    in_source = set(kernel_signatures(kernel_source(source)))
    assert set(entry_names(source)) == in_source


def _kernels():
    for spec in ops.SPECS.values():
        for k in spec.kernels:
            yield spec, k


@pytest.mark.parametrize("spec,kernel", list(_kernels()), ids=lambda v: getattr(v, "name", ""))
def test_kernel_parameters_are_the_specs_names_in_the_kernels_order(spec, kernel):
    sigs = kernel_signatures(kernel_source(kernel.source))
    if not kernel.typed:
        assert kernel.name in sigs
        return
    for sfx, ctype in (("f32", "float"), ("f64", "double")):
        params = sigs[f"{kernel.name}_{sfx}"]
        names = tuple(p[2] for p in params)
        want = kernel.params + (PERSISTENT_TAIL if kernel.source == "lstm_persistent.cu" else ())
        assert names == want, (kernel.name, sfx)
        for (ptr, base, name) in params[:len(kernel.params)]:
            decl = spec._by_name.get(name)
            if decl is None:                            # a dimension
                assert (ptr, base) == (False, "long long"), name
            elif isinstance(decl, Scalar):
                assert not ptr and base == ({"T": ctype}.get(decl.dtype) or {"float64": "double"}[decl.dtype]), name
            else:
                assert isinstance(decl, Arg) and ptr, name
                assert base == {"T": ctype, "int64": "long long", "float64": "double"}[decl.dtype], name


def test_graph_copies_are_the_specs():
    for name in ops.REFERENCE:
        assert cuda_graphs.SPECS[name] == dict(read=ops.SPECS[name].reads(), write=ops.SPECS[name].writes())


@pytest.mark.parametrize("device", ops.DEVICES)
def test_implementations_take_the_specs_arguments(device):
    impls = ops.implementations(device)
    for name, fn in impls.items():
        spec = ops.SPECS.get(name)
        params = list(inspect.signature(fn).parameters)
        if spec is None or params[1:2] == ["args"]:      # helper entries; *args forwarders
            continue
        declared = [a.name for a in spec.args if a.name in params]
        assert params[1:len(declared) + 1] == declared, (device, name)
    for name, fn in ops.REFERENCE.items():
        assert list(inspect.signature(fn).parameters)[1:] == [a.name for a in ops.SPECS[name].args]


# -- what the reference loops read and write, observed ----------------------------------------------
T, B, H = 3, 2, 4


def _inputs(spec, rng):
    dims = dict(T=T, B=B, H=H)
    vals = {}
    for a in spec.args:
        if isinstance(a, Scalar):
            vals[a.name] = {"precision": "float32", "eps": 1e-5}.get(a.name, 0.7)
        else:
            vals[a.name] = rng.uniform(-1, 1, spec.shape(a.name, dims))
    vals["mask"] = np.ones((T, B))
    vals["zc"] = vals["zh"] = np.full((T, B, H), 0.25)
    vals["gmask"] = np.full((T, B, H), 1.25)
    return vals


def _run(name, vals):
    from xlstm.backends import resolve

    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vals.items()}
    ops.REFERENCE[name](resolve("numpy"), **out)
    return out


@pytest.mark.parametrize("name", list(ops.REFERENCE))
def test_sequence_specs_say_what_the_loop_reads_and_writes(name):
    spec = ops.SPECS[name]
    vals = _inputs(spec, np.random.default_rng(0))
    base = _run(name, vals)
    arrays = [a for a in spec.arrays()]
    written = {a.name for a in arrays if not np.array_equal(base[a.name], vals[a.name])}
    assert written <= set(spec.writes()) and {"dz", "gates", "hs", "cs"} & set(spec.writes()) <= written | {"dz"}
    for a in arrays:
        poked = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vals.items()}
        if a.first:
            poked[a.name][1:] = np.nan                  # only index 0 is read
        elif not a.read:
            poked[a.name][...] = np.nan                 # an output only: its old value is unused
        else:
            poked[a.name] = poked[a.name] + 0.125       # a read input: it must matter
        got = _run(name, poked)
        same = all(np.array_equal(got[w], base[w]) for w in spec.writes())
        if a.read and not a.first:
            assert not same, f"{name}: {a.name} is declared read but changes nothing"
        else:
            assert same, f"{name}: {a.name} is declared {'first-only' if a.first else 'unread'} but matters"
