"""The GPU session's first part (well under 15 s): can this device run what the later parts need?

    python -m benchmarks.gpu_smoke OUT

Writes ``OUT/machine.txt`` (GPU, driver, versions, commit) and ``OUT/smoke.json``, rewritten as
each check ends (a check that kills the process leaves the earlier ones on disk), with
"ok" or why not for:

- ``cupy``: the CuPy backend is usable;
- ``nvmath``: nvmath-python's cuBLAS binding loads (CUDA-graph replay and tf32/bf16 need it);
- ``graphs``: a tiny 2-layer LSTM forward + backward with CUDA graphs on equals graphs off,
  bitwise, and its loops were captured;
- ``persistent``: the same model (float64) on the persistent kernels equals the per-step
  kernels within 1e-12.

``benchmarks/gpu_session.py`` reads it: graphs not ok -> the later parts run with
XLSTM_CUDA_GRAPHS=0; persistent not ok -> XLSTM_PERSISTENT=off and the persistent steps are
skipped; nvmath or cupy not ok -> the steps that need them are skipped, each saying why.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

OK = "ok"


def _write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def machine_text(root: str) -> str:
    """GPU, driver, versions and the commit, as lines of text (informative: nothing here fails)."""
    lines = [f"date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"]
    for cmd in (["git", "-C", root, "rev-parse", "--short", "HEAD"],
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            lines.append(f"{cmd[0]}: {(r.stdout or r.stderr).strip()}")
        except Exception as e:
            lines.append(f"{cmd[0]}: not available ({type(e).__name__})")
    lines.append(f"python {sys.version.split()[0]}, numpy {np.__version__}")
    from importlib import metadata

    for d in ("cupy-cuda13x", "cupy-cuda12x", "nvmath-python", "cuda-bindings", "cuda-core", "torch"):
        try:
            lines.append(f"{d} {metadata.version(d)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        import cupy

        lines.append(f"cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")
    except Exception as e:
        lines.append(f"cupy: not usable ({type(e).__name__}: {e})")
    # torch is not imported here (seconds of the 15): the bench steps record its CUDA and cuDNN
    return "\n".join(lines) + "\n"


def _run(be, x, dy, seed=0, dtype="float32"):
    import xlstm

    m = xlstm.LSTM(x.shape[2], 16, num_layers=2, seed=seed, dtype=dtype, backend=be)
    y, _ = m.forward(be.asarray(x.astype(dtype)))
    dx, _ = m.backward(be.asarray(dy.astype(dtype)))
    out = {"y": y, "dx": dx, **{"d" + k: g for k, g in m.grads.items()}}
    return {k: be.to_numpy(v, copy=True) for k, v in out.items()}


def check_graphs(be, x, dy) -> str:
    if not be.graphs_active():
        return "CUDA graphs are not active (nvmath-python missing or graphs switched off)"
    before = be.graphs.captures
    on = _run(be, x, dy)
    if be.graphs.failure is not None:
        return f"capture failed: {be.graphs.failure}"
    if be.graphs.captures == before:
        return "nothing was captured"
    be.cuda_graphs = False
    try:
        off = _run(be, x, dy)
    finally:
        be.cuda_graphs = True
    bad = [k for k in on if not np.array_equal(on[k], off[k])]
    return OK if not bad else f"graphs on and off differ in {', '.join(bad)}"


def check_persistent(be, x, dy) -> str:
    prev = be.persistent
    try:
        be.persistent = "off"
        ref = _run(be, x, dy, dtype="float64")
        be.persistent = "on"
        got = _run(be, x, dy, dtype="float64")
        if be.last_path != "persistent":
            return f"the persistent kernels did not run (last path {be.last_path})"
    finally:
        be.persistent = prev
    err = max(float(np.max(np.abs(got[k] - ref[k]))) / max(float(np.max(np.abs(ref[k]))), 1e-300) for k in ref)
    return OK if err <= 1e-12 else f"persistent differs from per-step by {err:.3g} (relative)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    out = argv[0]
    os.makedirs(out, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(out, "smoke.json")
    res = {}
    with open(os.path.join(out, "machine.txt"), "w") as f:
        f.write(machine_text(root))
    from xlstm.backends import cupy_unavailable_reason

    why = cupy_unavailable_reason()
    res["cupy"] = why or OK
    _write(path, res)
    if why:
        print(f"smoke: cupy not usable: {why}")
        return 1
    from xlstm.backends import resolve

    be = resolve("cupy")
    res["device"] = be.device_info()[0]
    try:
        from nvmath.bindings import cublas

        cublas.create
        res["nvmath"] = OK
    except Exception as e:
        res["nvmath"] = f"nvmath-python's cuBLAS binding is not usable ({type(e).__name__}: {e})"
    _write(path, res)
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((5, 3, 4)), rng.standard_normal((5, 3, 16))
    for name, check in (("graphs", check_graphs), ("persistent", check_persistent)):
        t0 = time.perf_counter()
        try:
            res[name] = check(be, x, dy)
        except Exception as e:
            res[name] = f"{type(e).__name__}: {e}"
        res[name + "_s"] = round(time.perf_counter() - t0, 3)
        _write(path, res)
    for k in ("cupy", "nvmath", "graphs", "persistent"):
        print(f"smoke: {k}: {res[k]}")
    return 0 if all(res[k] == OK for k in ("cupy", "nvmath", "graphs", "persistent")) else 1


if __name__ == "__main__":
    sys.exit(main())
