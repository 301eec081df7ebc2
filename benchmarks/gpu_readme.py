"""Write the README of a GPU check folder from what ``benchmarks/gpu_check.sh`` left there.

    python benchmarks/gpu_readme.py benchmarks/results/gpu-h200

Reads ``gpu.json`` (the bench: NumPy, CuPy and torch rows), ``machine.txt``, ``summary.txt``,
``pytest_gpu.txt`` and ``embedding_grad.json`` when present, and writes ``README.md``: the
command, the machine, the gpu-test result, one table with NumPy, CuPy and cuDNN side by side
per cell (every cell, also where CuPy loses), and the embedding-gradient micro-benchmark.
Nothing here measures; a missing input is said as missing, never filled in.
"""
from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):                 # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xlstm.bench import _fmt, _ratio  # noqa: E402


def _read(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def _shown(folder: str) -> str:
    """The folder relative to the repository root when it lies inside it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = os.path.relpath(os.path.abspath(folder), root)
    return folder if rel.startswith("..") else rel


def side_by_side(rows) -> list[str]:
    """One Markdown row per (layers, H, T, B): NumPy, torch CPU, CuPy, cuDNN, ratios."""
    by = {}
    for r in rows:
        by.setdefault((r["layers"], r["H"], r["T"], r["B"]), {})[r["backend"]] = r
    out = ["| layers | H | T | B | NumPy step | torch CPU step | CuPy step | cuDNN step | CuPy GEMM floor "
           "| CuPy / cuDNN | CuPy speedup over NumPy | CuPy fwd | cuDNN fwd | check (max rel err) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(by):
        n, c = by[key].get("numpy"), by[key].get("cupy")
        ok_n = n is not None and n["status"] == "ok"
        ok_c = c is not None and c["status"] == "ok"
        cell = [str(k) for k in key]
        cell.append(_fmt(n["step_ms"]) if ok_n else ("skipped" if n else "not run"))
        cell.append(_fmt(n.get("torch_step_ms")) if ok_n else "-")
        cell.append(_fmt(c["step_ms"]) if ok_c else ("skipped" if c else "not run"))
        cell.append(_fmt(c.get("torch_step_ms")) if ok_c else "-")
        cell.append(_fmt(c.get("floor_step_ms")) if ok_c else "-")
        vs = _ratio(c["step_ms"], c.get("torch_step_ms")) if ok_c else None
        cell.append("-" if vs is None else (f"**{vs:.2f}x (CuPy slower)**" if vs > 1 else f"{vs:.2f}x"))
        sp = _ratio(n["step_ms"], c["step_ms"]) if ok_n and ok_c else None
        cell.append("-" if sp is None else (f"**{sp:.2f}x (CuPy slower)**" if sp < 1 else f"{sp:.1f}x"))
        cell.append(_fmt(c.get("fwd_ms")) if ok_c else "-")
        cell.append(_fmt(c.get("torch_fwd_ms")) if ok_c else "-")
        errs = [r.get("check_max_rel_err") for r in (n, c) if r is not None and r["status"] == "ok"]
        cell.append(", ".join(f"{e:.1e}" for e in errs if e is not None) or "-")
        out.append("| " + " | ".join(cell) + " |")
    skipped = [f"{r['backend']} L={r['layers']} H={r['H']} T={r['T']} B={r['B']}: {r['note']}"
               for r in rows if r["status"] != "ok"]
    if skipped:
        out += ["", "Skipped cells (not measured):", ""] + [f"- {s}" for s in skipped]
    return out


def embedding_table(res) -> list[str]:
    out = ["| V | N | dim | sort ms | one-hot ms | add.at ms | repeatable (sort / one-hot / add.at) |",
           "|---:|---:|---:|---:|---:|---:|---|"]
    by = {}
    for r in res["rows"]:
        by.setdefault((r["V"], r["N"], r["dim"]), {})[r["method"]] = r
    for key in sorted(by):
        m = by[key]
        t = [_fmt((m.get(k) or {}).get("median_ms"), 3) for k in ("sort", "onehot", "add.at")]
        rep = [{True: "yes", False: "NO", None: "-"}[(m.get(k) or {}).get("bitwise_repeatable")]
               for k in ("sort", "onehot", "add.at")]
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {t[0]} | {t[1]} | {t[2]} | {' / '.join(rep)} |")
    return out


def build(folder: str) -> str:
    res_text = _read(folder, "gpu.json")
    if res_text is None:
        raise SystemExit(f"{folder}/gpu.json is missing: run benchmarks/gpu_check.sh {folder} first")
    res = json.loads(res_text)
    meta, rows = res.get("meta", {}), res["rows"]
    machine = meta.get("machine", {})
    lines = [f"# GPU check: NumPy vs CuPy vs cuDNN ({machine.get('gpu', 'GPU unknown')})", ""]
    lines += ["Written by `benchmarks/gpu_readme.py` from the files in this folder, which "
              "`benchmarks/gpu_check.sh` wrote in one run.", "", "## Command", "", "```",
              f"bash benchmarks/gpu_check.sh {_shown(folder)}", "```", ""]
    cmds = [m.get("command") for m in meta.get("runs", [meta]) if m.get("command")]
    if cmds:
        lines += ["The bench runs in it:", "", "```"] + cmds + ["```", ""]
    lines += ["## Machine", "", "```", (_read(folder, "machine.txt") or "machine.txt missing").rstrip(), "```", ""]
    pyt = _read(folder, "pytest_gpu.txt")
    last = [s for s in (pyt or "").splitlines() if s.strip()]
    lines += ["## GPU tests (`pytest -m gpu`)", "", f"`{last[-1] if last else 'pytest_gpu.txt missing'}` "
              "(full log: `pytest_gpu.txt`)", ""]
    lines += ["## Training step, ms (medians; forward + backward, no optimizer)", "",
              f"{rows[0]['dtype'] if rows else ''}; input size = H; TF32 off for torch/cuDNN "
              "(cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False; CuPy does not use TF32 unless "
              "CUPY_TF32=1). Each cell's results were checked against torch, and CuPy against NumPy, "
              "before timing. `CuPy / cuDNN` above 1 and a speedup below 1 are where CuPy loses.", ""]
    lines += side_by_side(rows) + [""]
    if os.path.exists(os.path.join(folder, "gpu.png")):
        lines += ["![bench](gpu.png)", ""]
    summ = _read(folder, "summary.txt")
    if summ:
        lines += ["## Summary", "", "```", summ.rstrip(), "```", ""]
    emb = _read(folder, "embedding_grad.json")
    lines += ["## Embedding gradient: sort-segment vs one-hot GEMM vs atomic add.at", ""]
    if emb:
        lines += ["float32, medians (ms); ids with one id in a quarter of the positions; "
                  "`repeatable`: two identical calls gave the same bits.", ""]
        lines += embedding_table(json.loads(emb)) + [""]
    else:
        lines += ["embedding_grad.json missing (not measured)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    text = build(argv[0])
    with open(os.path.join(argv[0], "README.md"), "w") as f:
        f.write(text + "\n")
    print(f"wrote {os.path.join(argv[0], 'README.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
