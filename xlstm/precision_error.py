"""The measured error of the precision modes against float64 (the README's table).

    python -c "import xlstm.precision_error as e; print(e.error_table())"

``error_against_float64`` runs one fixed model in a mode and in float64 and returns the normwise
relative error of every output and gradient; tests/test_precision.py bounds it. The modes and
their error model: ``xlstm/precision.py``.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .precision import MODES, PrecisionEmulationWarning, round_tf32


# Two layers, H=128, D=32, T=50, B=16, x and dy standard normal, weights from seed 0: large
# enough that every GEMM sums 32-512 terms, small enough to run in about a second on a CPU.
REPORT_MODEL = dict(input_size=32, hidden_size=128, num_layers=2, T=50, B=16)


def error_against_float64(precision: str, layer_norm: bool = False, backend="numpy", seed: int = 0,
                          tf32_rounding: str = "rne", **model) -> dict:
    """Normwise relative error ||a - a64|| / ||a64|| of every forward output and gradient of a
    float32 LSTM in ``precision`` against the same model (same float32 weights, inputs, dy) run
    in float64. Keys: y, h_n, c_n, dx, dh0, dc0 and 'd' + each parameter name.

    ``tf32_rounding='rz'`` emulates truncating TF32 operands instead (NumPy backend only), to
    bound what a GPU that truncates would give. ``model`` overrides ``REPORT_MODEL``."""
    from . import backends
    from .lstm import LSTM

    cfg = dict(REPORT_MODEL, **model)
    T, B = cfg.pop("T"), cfg.pop("B")
    be = backends.resolve(backend)
    base = LSTM(**cfg, layer_norm=layer_norm, seed=seed, backend="numpy")
    rng = np.random.default_rng([seed, 12])
    x = rng.standard_normal((T, B, cfg["input_size"])).astype(np.float32)
    dirs = 2 if cfg.get("bidirectional") else 1
    dy = rng.standard_normal((T, B, cfg["hidden_size"] * dirs)).astype(np.float32)

    def run(dtype, prec):
        m = LSTM(**cfg, layer_norm=layer_norm, dtype=dtype, seed=seed, backend=be, precision=prec)
        m.load_state_dict(base.state_dict())
        y, (h, c) = m.forward(x.astype(dtype))
        dx, (dh0, dc0) = m.backward(dy.astype(dtype))
        out = dict(y=y, h_n=h, c_n=c, dx=dx, dh0=dh0, dc0=dc0, **{"d" + k: v for k, v in m.grads.items()})
        return {k: np.asarray(be.to_numpy(v), np.float64) for k, v in out.items()}

    ref = run("float64", "float32")
    if tf32_rounding != "rne":
        if precision != "tf32" or be.name != "numpy":
            raise InputError("tf32_rounding applies to precision='tf32' on the numpy backend")
        from .ops import gemm                  # where the NumPy backend rounds its GEMM operands
        orig = gemm.round_operand
        gemm.round_operand = lambda a, p, out=None: round_tf32(a, tf32_rounding, out)
        try:
            got = run("float32", precision)
        finally:
            gemm.round_operand = orig
    else:
        got = run("float32", precision)
    return {k: float(np.linalg.norm(got[k] - ref[k]) / max(np.linalg.norm(ref[k]), 1e-300)) for k in ref}


def error_table() -> str:
    """The README's markdown tables: ``error_against_float64`` of every output, plain and LayerNorm,
    each mode (``python -c "import xlstm.precision_error as e; print(e.error_table())"``)."""
    import warnings

    warnings.simplefilter("ignore", PrecisionEmulationWarning)
    lines = []
    for ln in (False, True):
        rows = {p: error_against_float64(p, layer_norm=ln) for p in MODES}
        keys = list(rows["float32"])
        lines.append(f"\n{'LayerNorm' if ln else 'plain'} cell, " + ", ".join(f"{k}={v}" for k, v in REPORT_MODEL.items()))
        lines.append("| output | " + " | ".join(MODES) + " |")
        lines.append("|---|" + "---:|" * len(MODES))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{rows[p][k]:.1e}" for p in MODES) + " |")
    return "\n".join(lines)
