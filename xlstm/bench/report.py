"""Bench results as tables, Markdown, JSON, CSV and a figure: the public face of a run.

A result is ``{"meta": {...}, "rows": [row, ...]}``; a row is a dict with the ``COLUMNS`` keys
(``status`` "ok" / "skipped" / "error"; times in ms; ratios measured in the same run).
``load``/``ok_rows``/``ratio``/``fmt`` are what other tools (the GPU session's report) read
results with; nothing here measures.
"""
from __future__ import annotations

import csv
import json
import os

COLUMNS = [
    "backend", "device", "H", "T", "B", "layers", "layer_norm", "dtype", "precision", "status",
    "fwd_ms", "step_ms", "fwd_tokens_per_s", "step_tokens_per_s",
    "floor_fwd_ms", "floor_step_ms", "fwd_over_floor", "step_over_floor",
    "torch_fwd_ms", "torch_step_ms", "fwd_over_torch", "step_over_torch",
    "speedup_vs_numpy", "peak_mem_mb", "alloc_peak_mb", "torch_peak_mem_mb",
    "check_max_rel_err", "repeats", "cell_seconds", "foreign_cpu_load",
    "cuda_graphs", "first_step_ms", "graph_capture_s", "graph_mb", "pool_growth_mb",
    "floor_captured", "host_fwd_us", "host_bwd_us", "note",
]



def ratio(a, b):
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


def load(path: str) -> dict:
    """A result saved by ``write_outputs`` (JSON), or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def ok_rows(result, backend: str = "cupy", layers: int = 1) -> dict:
    """{(H, T, B): row} of a result's timed rows of ``backend`` with ``layers`` layers ({} for None)."""
    if result is None:
        return {}
    return {(r["H"], r["T"], r["B"]): r for r in result["rows"]
            if r["status"] == "ok" and r["backend"] == backend and r["layers"] == layers}


def fmt(v, nd=2):
    """A number for a table: 3 significant digits from 1e5, no decimals from 100, else ``nd``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v >= 1e5:
            return f"{v:.3g}"
        if v >= 100:
            return f"{v:.0f}"
        return f"{v:.{nd}f}"
    return str(v)


def _kind(r) -> str:
    """dtype, GEMM precision and cell of a row, for the tables' group titles."""
    prec = r.get("precision") or "float32"
    return (r["dtype"] + ("" if prec == "float32" else f" ({prec} GEMMs)")
            + (", LayerNorm cell" if r.get("layer_norm") else ""))


def format_table(rows) -> str:
    """The readable table: one block per backend/batch/dtype, ratios measured in the same run."""
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["backend"], r["B"], _kind(r)), []).append(r)
    for (be, B, dtype), rs in groups.items():
        has_speedup = any(r.get("speedup_vs_numpy") for r in rs)
        lines.append(f"\n{be} backend ({'GPU' if be == 'cupy' else 'CPU'}), B={B}, {dtype}; times in ms "
                     f"(medians); torch = nn.LSTM on the same device; peak MB = "
                     f"{'pool peak above the start' if be == 'cupy' else 'process RSS peak'}")
        hdr = (f"{'L':>2} {'H':>5} {'T':>4} | {'fwd':>9} {'step':>9} {'tok/s':>8} | {'floor':>9} "
               f"{'step/fl':>7} | {'torch fwd':>9} {'torch stp':>9} {'fwd/tch':>7} {'stp/tch':>7} | "
               f"{'peak MB':>7} {'alloc MB':>8}" + (f" | {'vs numpy':>8}" if has_speedup else ""))
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for r in sorted(rs, key=lambda r: (r["layers"], r["H"], r["T"])):
            if r["status"] != "ok":
                lines.append(f"{r['layers']:>2} {r['H']:>5} {r['T']:>4} | {r['status']}: {r['note']}")
                continue
            line = (f"{r['layers']:>2} {r['H']:>5} {r['T']:>4} | {fmt(r['fwd_ms']):>9} {fmt(r['step_ms']):>9} "
                    f"{fmt(r['step_tokens_per_s']):>8} | {fmt(r['floor_step_ms']):>9} "
                    f"{fmt(r['step_over_floor']):>7} | {fmt(r['torch_fwd_ms']):>9} {fmt(r['torch_step_ms']):>9} "
                    f"{fmt(r['fwd_over_torch']):>7} {fmt(r['step_over_torch']):>7} | {fmt(r['peak_mem_mb'], 1):>7} "
                    f"{fmt(r.get('alloc_peak_mb'), 1):>8}")
            if (r.get("foreign_cpu_load") or 0) > 0.25:
                line += f"  (other load {r['foreign_cpu_load']:.1f} cores)"
            if r.get("first_step_ms") is not None:     # cupy: first call (capture) vs steady state
                line += (f"  (graphs {r.get('cuda_graphs')}: first step {fmt(r['first_step_ms'])} ms, "
                         f"graphs {fmt(r.get('graph_mb'), 1)} MB, pool +{fmt(r.get('pool_growth_mb'), 1)} MB)")
            if has_speedup:
                line += f" | {fmt(r.get('speedup_vs_numpy'), 1):>8}"
            lines.append(line)
    return "\n".join(lines)


def markdown_table(rows) -> str:
    """The summary as a Markdown table (for READMEs): one line per cell, the ratios of that run."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["backend"], r["B"], _kind(r)), []).append(r)
    for (be, B, dtype), rs in groups.items():
        sp = any(r.get("speedup_vs_numpy") for r in rs)
        out.append(f"\n**{be}** ({'GPU' if be == 'cupy' else 'CPU'}), B={B}, {dtype}, times in ms (medians)\n")
        out.append("| layers | H | T | fwd | step | tokens/s | GEMM floor | step/floor | torch step | step/torch "
                   "| floor/torch | other load |" + (" CuPy/NumPy speedup |" if sp else ""))
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if sp else ""))
        for r in sorted(rs, key=lambda r: (r["layers"], r["H"], r["T"])):
            if r["status"] != "ok":
                out.append(f"| {r['layers']} | {r['H']} | {r['T']} | {r['status']}: {r['note']} |||||||||"
                           + ("|" if sp else ""))
                continue
            out.append(f"| {r['layers']} | {r['H']} | {r['T']} | {fmt(r['fwd_ms'])} | {fmt(r['step_ms'])} | "
                       f"{fmt(r['step_tokens_per_s'])} | {fmt(r['floor_step_ms'])} | "
                       f"{fmt(r['step_over_floor'])} | {fmt(r['torch_step_ms'])} | {fmt(r['step_over_torch'])} | "
                       f"{fmt(ratio(r['floor_step_ms'], r['torch_step_ms']))} | "
                       f"{fmt(r.get('foreign_cpu_load'), 1)} |"
                       + (f" {fmt(r.get('speedup_vs_numpy'), 1)} |" if sp else ""))
    return "\n".join(out)


def write_outputs(result: dict, out_dir: str, stem: str, plot: bool = True) -> dict:
    """JSON, CSV and (when matplotlib is installed) PNG under ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    paths["json"] = os.path.join(out_dir, stem + ".json")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=float)
        f.write("\n")
    paths["csv"] = os.path.join(out_dir, stem + ".csv")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    if plot:
        png = os.path.join(out_dir, stem + ".png")
        why = plot_results(result, png)
        if why is None:
            paths["png"] = png
        else:
            paths["png_skipped"] = why
    return paths


def plot_results(result: dict, path: str) -> str | None:
    """The figure (``figure``) as a PNG at ``path``.

    Returns None when written, or why not (matplotlib missing, nothing to plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'xlstm-bptt[plot]')"
    fig = figure(result)
    if fig is None:
        return "no timed cells"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _h_axis(ax, Hs) -> None:
    """Log-scaled H with plain integer labels at the measured sizes only: matplotlib's own log
    ticks would add minor labels (6x10^1 beside 64) that overlap the measured ones."""
    import matplotlib.ticker as mt

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(mt.FixedLocator(Hs))
    ax.xaxis.set_major_formatter(mt.FixedFormatter([str(h) for h in Hs]))
    ax.xaxis.set_minor_locator(mt.NullLocator())
    ax.xaxis.set_minor_formatter(mt.NullFormatter())


def figure(result: dict):
    """Time vs H per T (each backend, torch and the floor) and the ratios below it, one pair of
    rows of panels per layer count; None when no cell was timed. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as mt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return None
    Ts = sorted({r["T"] for r in rows})
    layer_counts = sorted({r["layers"] for r in rows})
    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(2 * len(layer_counts), len(Ts), figsize=(5 * len(Ts), 8.5 * len(layer_counts)),
                             squeeze=False)
    colors = {"numpy": "tab:blue", "cupy": "tab:green"}
    for i, layers in enumerate(layer_counts):
        for j, T in enumerate(Ts):
            ax, ax2 = axes[2 * i][j], axes[2 * i + 1][j]
            Hs = sorted({r["H"] for r in rows if r["layers"] == layers and r["T"] == T})
            for B in batches:
                sel = [r for r in rows if r["T"] == T and r["layers"] == layers and r["B"] == B]
                sfx = f" B={B}" if len(batches) > 1 else ""
                ls = "-" if B == batches[0] else ":"
                for be in ("numpy", "cupy"):
                    rs = sorted((r for r in sel if r["backend"] == be), key=lambda r: r["H"])
                    if not rs:
                        continue
                    hs = [r["H"] for r in rs]
                    dev = "GPU" if be == "cupy" else "CPU"
                    ax.plot(hs, [r["step_ms"] for r in rs], ls, marker="o", color=colors[be],
                            label=f"xlstm {be}{sfx}")
                    ax.plot(hs, [r["floor_step_ms"] for r in rs], ls, marker=".", color=colors[be], alpha=0.45,
                            label=f"GEMM floor {dev}{sfx}")
                    tr = [(r["H"], r["torch_step_ms"]) for r in rs if r["torch_step_ms"]]
                    if tr:
                        ax.plot(*zip(*tr), ls, marker="s", color="tab:red" if be == "numpy" else "tab:purple",
                                label=f"torch {'CPU' if be == 'numpy' else 'cuDNN'}{sfx}")
                    ax2.plot(hs, [r["step_over_floor"] for r in rs], ls, marker=".", color=colors[be],
                             alpha=0.45, label=f"{be} step / floor{sfx}")
                    rt = [(r["H"], r["step_over_torch"]) for r in rs if r["step_over_torch"]]
                    if rt:
                        ax2.plot(*zip(*rt), ls, marker="s", color=colors[be], label=f"{be} / torch{sfx}")
                    sp = [(r["H"], r["speedup_vs_numpy"]) for r in rs if r.get("speedup_vs_numpy")]
                    if sp:
                        ax2.plot(*zip(*sp), ls, marker="^", color="black", label=f"CuPy speedup over NumPy{sfx}")
            ax.set(yscale="log", xlabel="hidden size H (input = H)", ylabel="training step (ms)",
                   title=f"T={T}, {layers} layer{'s' if layers > 1 else ''}, {rows[0]['dtype']}")
            ax2.axhline(1.0, color="gray", lw=0.8)
            ax2.set(yscale="log", xlabel="hidden size H", ylabel="ratio (x)",
                    title=f"ratios, {layers} layer{'s' if layers > 1 else ''}"
                    + ("" if any(r.get("speedup_vs_numpy") for r in rows) else " (no CuPy results in this run)"))
            ax2.yaxis.set_major_formatter(mt.FormatStrFormatter("%g"))
            ax2.yaxis.set_minor_formatter(mt.FormatStrFormatter("%g"))
            for a in (ax, ax2):
                if Hs:
                    _h_axis(a, Hs)
                a.grid(True, which="both", alpha=0.3)
                if a.get_legend_handles_labels()[0]:
                    a.legend(fontsize=7)
    m = result.get("meta", {})
    fig.suptitle(f"xlstm bench: {m.get('machine', {}).get('cpu', '')} "
                 f"{('/ ' + m['machine']['gpu']) if m.get('machine', {}).get('gpu') else ''}", fontsize=10)
    fig.tight_layout()
    return fig
