"""Write the README of a GPU session folder from what ``benchmarks/gpu_session.sh`` left there.

    python benchmarks/gpu_readme.py benchmarks/results/gpu-h200

Reads what is present of: ``session.jsonl`` (the parts: done / failed / timeout / skipped),
``machine.txt``, ``nvmath.txt``, ``tests.jsonl`` (gpu tests per file), ``gpu.json`` (CuPy vs
cuDNN), ``b256.json``, ``graphs-off.json``, ``ln.json`` (LayerNorm cell), ``numpy.json`` (NumPy
and CuPy in one run), ``persistent-{off,on}.json``, ``precision-{tf32,bf16}.json``,
``train-{float32,bf16}.json``, ``embedding_grad.json``; writes
``README.md`` (command, machine, tables, the targets of issues 9-12 with the measured value and
MET / NOT MET / NOT MEASURED) and ``targets.txt`` (the targets alone, as plain text). Nothing
here measures; a missing input is said as missing, never filled in.

Two helpers for the session script (they parse, they do not measure):

    gpu_readme.py --test-line JSONL GROUP NAME RC SECONDS TIMED_OUT LOG|NOTE
    gpu_readme.py --train-summary OUT MODE RC STEPS
"""
from __future__ import annotations

import json
import os
import re
import sys

if __package__ in (None, ""):                 # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xlstm.bench.report import fmt as _fmt, ratio as _ratio  # noqa: E402


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


def side_by_side(rows, same_run=None) -> list[str]:
    """One Markdown row per (layers, H, T, B): NumPy, torch CPU, CuPy, cuDNN, ratios.

    ``same_run``: {(layers, H, T, B): NumPy step / CuPy step} measured in one run, shown as
    the speedup instead of the ratio of the two rows (which may come from two runs)."""
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
        if same_run is not None:
            sp = same_run.get(key)
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


TARGETS_NOTE = ("Targets are the issues' own (benchmarks on the H200, same run, TF32 off on both sides "
                "unless the mode says otherwise). A target needs every cell it names: with some cells "
                "missing and none failing it is NOT MEASURED.")
TRAIN_BASELINE_STEPS_PER_S = 150 / 1.8   # issue 10: `xlstm train --backend cupy`, 150 steps in 1.8 s


# -- inputs -------------------------------------------------------------------------------------
def _json(folder, name):
    text = _read(folder, name)
    return None if text is None else json.loads(text)


def _jsonl(folder, name):
    text = _read(folder, name)
    return [] if text is None else [json.loads(s) for s in text.splitlines() if s.strip()]


def _ok(res, backend="cupy"):
    """{(H, T, B): row} of a bench result's timed rows of ``backend`` (one layer)."""
    if res is None:
        return {}
    return {(r["H"], r["T"], r["B"]): r for r in res["rows"]
            if r["status"] == "ok" and r["backend"] == backend and r["layers"] == 1}


def pytest_counts(text: str) -> dict:
    """passed / failed / errors / skipped counts of pytest's last summary line (0 when absent)."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped)", line)
        if found:
            for n, what in found:
                counts["errors" if what.startswith("error") else what] += int(n)
            break
    return counts


def record_test_file(jsonl, group, name, rc, seconds, timed_out, log_or_note) -> dict:
    """Append one test file's outcome to ``jsonl``: the counts from its log, or a note."""
    rec = dict(group=group, file=name, rc=int(rc), seconds=int(seconds), timed_out=bool(int(timed_out)))
    if os.path.exists(log_or_note):
        with open(log_or_note) as f:
            text = f.read()
        rec.update(pytest_counts(text))
        last = [s for s in text.splitlines() if s.strip()]
        rec["summary"] = last[-1].strip("= ") if last else "(empty log)"
    else:
        rec.update(passed=0, failed=0, errors=0, skipped=0, summary=log_or_note)
    with open(jsonl, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def train_summary(out, mode, rc, steps) -> dict:
    """train-MODE.json from the run's metrics.jsonl and log: steady steps/s (from the first
    logged step at or past a third of the run to the last one, so capture and warm-up stay
    out), the whole run's wall time, the final validation loss."""
    recs = _jsonl(out, f"train-{mode}-metrics.jsonl")
    train = [r for r in recs if r.get("split") == "train"]
    val = [r for r in recs if r.get("split") == "val"]
    res = dict(mode=mode, rc=int(rc), steps=int(steps), steps_per_s=None, final_val_loss=None,
               wall_s=None, note="")
    start = [r for r in train if r["step"] >= int(steps) // 3]
    if len(start) >= 2 and start[-1]["elapsed_s"] > start[0]["elapsed_s"]:
        res["steps_per_s"] = (start[-1]["step"] - start[0]["step"]) / (start[-1]["elapsed_s"] - start[0]["elapsed_s"])
        res["steady_from_step"] = start[0]["step"]
    if val:
        res["final_val_loss"], res["val_step"] = val[-1]["loss"], val[-1]["step"]
    log = _read(out, f"train-{mode}.txt") or ""
    m = re.search(r"done: (\d+) steps in ([0-9.]+) s", log)
    if m:
        res["wall_s"] = float(m.group(2))
    if int(rc) != 0:
        res["note"] = (log.strip().splitlines() or ["(no output)"])[-1][:300]
    with open(os.path.join(out, f"train-{mode}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


# -- targets ------------------------------------------------------------------------------------
def _verdict_cells(cells, values, limit, fmt="{:.2f}x", above=False):
    """MET / NOT MET / NOT MEASURED of ``value <= limit`` (``>=`` with ``above``) over every cell;
    returns (measured text, verdict)."""
    got = {c: values[c] for c in cells if values.get(c) is not None}
    if not got:
        return "-", "NOT MEASURED"
    bad = [c for c, v in got.items() if (v < limit if above else v > limit)]
    text = ", ".join(f"H={c[0]} T={c[1]} B={c[2]}: {fmt.format(v)}" for c, v in sorted(got.items()))
    if bad:
        return text, "NOT MET"
    if len(got) < len(cells):
        return text + f" ({len(got)} of {len(cells)} cells)", "NOT MEASURED"
    return text, "MET"


def _grid(Hs, Ts, Bs):
    return [(H, T, B) for H in Hs for T in Ts for B in Bs]


def targets(folder) -> list:
    """[(issue, target, measured, verdict)] of issues 9-12 from the folder's files."""
    out = []
    gpu, b256 = _json(folder, "gpu.json"), _json(folder, "b256.json")
    a, a256 = _ok(gpu), _ok(b256)
    vs_torch = {k: r.get("step_over_torch") for k, r in {**a, **a256}.items()}
    tests = _jsonl(folder, "tests.jsonl")

    # issue 9: the two-backend run (numpy.json; a single gpu.json of both backends counts too)
    npr = _json(folder, "numpy.json")
    two = npr if npr is not None else (gpu if gpu and "numpy" in gpu.get("meta", {}).get("backends", []) else None)
    what = "`xlstm bench --backends numpy,cupy` passes its checks"
    if two is None:
        out.append(("9", what, "numpy.json missing", "NOT MEASURED"))
    else:
        failed = two.get("meta", {}).get("check_failed")
        n = sum(1 for r in two["rows"] if r["status"] == "ok" and r["backend"] == "cupy")
        out.append(("9", what, f"check failed: {failed}" if failed else f"{n} CuPy cells checked against NumPy before timing",
                    "NOT MET" if failed else ("MET" if n else "NOT MEASURED")))
    for f, what in (("test_train", "GPU training bitwise repeatable; Ctrl-C + --resume equals the uninterrupted run"),
                    (None, "every gpu test passes (all files)")):
        recs = [t for t in tests if f is None or t["file"] == f]
        if not recs:
            out.append(("9", what, "tests not run", "NOT MEASURED"))
            continue
        p, fl = sum(t["passed"] for t in recs), sum(t["failed"] + t["errors"] for t in recs)
        bad = [t["file"] for t in recs if t["rc"] != 0]
        out.append(("9", what, f"{p} passed, {fl} failed/errors" + (f" (rc != 0: {', '.join(bad)})" if bad else ""),
                    "NOT MET" if bad or fl else ("MET" if p else "NOT MEASURED")))

    # issue 10
    out.append(("10", "CuPy step <= 0.6x cuDNN, H 256/1024, T 64/256, B=64",
                *_verdict_cells(_grid((256, 1024), (64, 256), (64,)), vs_torch, 0.6)))
    out.append(("10", "CuPy step <= 1.0x cuDNN at H=2048 (B=64)",
                *_verdict_cells(_grid((2048,), (64, 256), (64,)), vs_torch, 1.0)))
    g256 = _grid((256, 1024, 2048), (64, 256), (256,))
    out.append(("10", "CuPy step <= 1.0x cuDNN at B=256, H >= 256", *_verdict_cells(g256, vs_torch, 1.0)))
    floor = {k: r.get("step_over_floor") for k, r in a256.items() if r.get("floor_captured")}
    out.append(("10", "B=256: step <= 1.15x its own GEMM floor (floor captured like the step)",
                *_verdict_cells(g256, floor, 1.15)))
    out.append(("10", "CuPy step <= 2x cuDNN at H=64 (B=64)", *_verdict_cells(_grid((64,), (64, 256), (64,)), vs_torch, 2.0)))
    host = {k: max(r["host_fwd_us"], r["host_bwd_us"]) for k, r in a.items()
            if r.get("cuda_graphs") == "on" and r.get("host_fwd_us") is not None}
    out.append(("10", "host time per time step per pass <= 8 us (graphs on; worst of fwd/bwd)",
                *_verdict_cells(sorted(a) if host else [(0, 0, 0)], host, 8.0, fmt="{:.1f} us")))
    ln = _ok(_json(folder, "ln.json"))
    ln_ratio = {k: r["step_ms"] / a[k]["step_ms"] for k, r in ln.items() if k in a}
    out.append(("10", "LayerNorm cell <= 1.5x the plain cell's step (H 256/1024, T 64/256, B=64)",
                *_verdict_cells(_grid((256, 1024), (64, 256), (64,)), ln_ratio, 1.5)))
    t32 = _json(folder, "train-float32.json")
    sps = t32 and t32.get("steps_per_s")
    out.append(("10", f"`xlstm train --backend cupy` >= 4x {TRAIN_BASELINE_STEPS_PER_S:.0f} steps/s "
                      f"(150 steps in 1.8 s before)",
                f"{sps:.0f} steps/s = {sps / TRAIN_BASELINE_STEPS_PER_S:.1f}x" if sps else "-",
                "NOT MEASURED" if not sps else ("MET" if sps >= 4 * TRAIN_BASELINE_STEPS_PER_S else "NOT MET")))
    cap = [r for r in a.values() if r.get("graph_capture_s") is not None]
    out.append(("10", "graph capture cost (first call vs steady) and graph memory reported",
                f"{len(cap)} cells with first step, capture time and graph MB" if cap else "-",
                "MET" if cap else "NOT MEASURED"))

    # issue 11
    on, off = _ok(_json(folder, "persistent-on.json")), _ok(_json(folder, "persistent-off.json"))
    p_torch = {k: r.get("step_over_torch") for k, r in on.items()}
    out.append(("11", "persistent step <= 1.0x cuDNN at H=64, T 64/256, B 16/64",
                *_verdict_cells(_grid((64,), (64, 256), (16, 64)), p_torch, 1.0)))
    out.append(("11", "persistent step <= 0.35x cuDNN at H 256/512, T 64/256, B 16/64",
                *_verdict_cells(_grid((256, 512), (64, 256), (16, 64)), p_torch, 0.35)))
    fwd = {k: r["fwd_ms"] * 1e3 / k[1] for k, r in on.items()}
    out.append(("11", "persistent forward <= 3 us per time step at H=64, B=64",
                *_verdict_cells(_grid((64,), (64, 256), (64,)), fwd, 3.0, fmt="{:.2f} us")))
    both = sorted(set(on) & set(off))
    out.append(("11", "crossover measured (persistent on vs off per cell; table below)",
                f"{len(both)} cells with both" if both else "-", "MET" if both else "NOT MEASURED"))

    # issue 12
    g12 = _grid((512, 1024, 2048), (64, 256), (64, 256))
    for mode, what in (("bf16", "torch.autocast(bf16) cuDNN"), ("tf32", "cuDNN TF32")):
        rows = _ok(_json(folder, f"precision-{mode}.json"))
        out.append(("12", f"{mode} step <= 1.0x {what}, H >= 512, T 64/256, B 64/256",
                    *_verdict_cells(g12, {k: r.get("step_over_torch") for k, r in rows.items()}, 1.0)))
    bf = _ok(_json(folder, "precision-bf16.json"))
    speed = {k: (a.get(k) or a256.get(k))["step_ms"] / r["step_ms"] for k, r in bf.items()
             if k[0] == 2048 and (a.get(k) or a256.get(k))}
    out.append(("12", "bf16 >= 4x this backend's float32 at H=2048 (float32: the bench part's rows)",
                *_verdict_cells(_grid((2048,), (64, 256), (64, 256)), speed, 4.0, above=True)))
    tb = _json(folder, "train-bf16.json")
    if t32 and tb and t32.get("final_val_loss") and tb.get("final_val_loss"):
        d = abs(tb["final_val_loss"] - t32["final_val_loss"]) / t32["final_val_loss"]
        out.append(("12", "`xlstm train --precision bf16` val loss within 2% of float32",
                    f"{tb['final_val_loss']:.4f} vs {t32['final_val_loss']:.4f} = {100 * d:.2f}% "
                    f"at step {tb.get('val_step')} (the issue's run is the default 800 steps)",
                    "MET" if d <= 0.02 else "NOT MET"))
    else:
        out.append(("12", "`xlstm train --precision bf16` val loss within 2% of float32", "-", "NOT MEASURED"))
    return out


# -- tables -------------------------------------------------------------------------------------
def _cell(c) -> str:
    """A Markdown table cell: no line breaks, no bare column separators."""
    return str(c).replace("\n", "; ").replace("|", "\\|")


def _table(header, rows) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows])


def _x(v, limit=None):
    if v is None:
        return "-"
    return f"**{v:.2f}x**" if limit is not None and v > limit else f"{v:.2f}x"


def cupy_detail(res_list) -> list[str]:
    """Per CuPy cell: step, its GEMM floor (captured or not), cuDNN, host time, graph costs."""
    rows = []
    for res in res_list:
        for k, r in sorted(_ok(res).items()):
            rows.append([*k, _fmt(r["step_ms"]), _fmt(r.get("floor_step_ms")),
                         {True: "yes", False: "no", None: "-"}[r.get("floor_captured")],
                         _x(r.get("step_over_floor")), _fmt(r.get("torch_step_ms")), _x(r.get("step_over_torch"), 1.0),
                         _fmt(r.get("host_fwd_us"), 1), _fmt(r.get("host_bwd_us"), 1), r.get("cuda_graphs") or "-",
                         _fmt(r.get("first_step_ms")), _fmt(r.get("graph_capture_s"), 3), _fmt(r.get("graph_mb"), 1)])
    return _table(["H", "T", "B", "step ms", "floor ms", "floor captured", "step/floor", "cuDNN ms",
                   "step/cuDNN", "host fwd us/step", "host bwd us/step", "graphs", "first step ms",
                   "capture s", "graphs MB"], rows)


def eager_vs_replay(gpu, off) -> list[str]:
    a, e = _ok(gpu), _ok(off)
    rows = [[*k, _fmt(r["step_ms"]), _fmt(a[k]["step_ms"]) if k in a else "-",
             _x(_ratio(r["step_ms"], a[k]["step_ms"])) if k in a else "-",
             _fmt(r.get("host_fwd_us"), 1), _fmt(a[k].get("host_fwd_us"), 1) if k in a else "-"]
            for k, r in sorted(e.items())]
    return _table(["H", "T", "B", "eager step ms", "replayed step ms", "eager/replayed",
                   "eager host fwd us/step", "replayed host fwd us/step"], rows)


def persistent_table(off, on) -> list[str]:
    o, p = _ok(off), _ok(on)
    notes = {(r["H"], r["T"], r["B"]): r["note"] for r in (on or {}).get("rows", []) if r["status"] != "ok"}
    rows = []
    for k in sorted(set(o) | set(p) | set(notes)):
        r_on, r_off = p.get(k), o.get(k)
        rows.append([*k, _fmt(r_off["step_ms"]) if r_off else "-",
                     _fmt(r_on["step_ms"]) if r_on else notes.get(k, "-")[:60],
                     _fmt((r_on or r_off or {}).get("torch_step_ms")),
                     _x(_ratio(r_on["step_ms"], r_off["step_ms"])) if r_on and r_off else "-",
                     _x(r_on.get("step_over_torch")) if r_on else "-",
                     _fmt(r_on["fwd_ms"] * 1e3 / k[1]) if r_on else "-",
                     ("on" if r_on["step_ms"] < r_off["step_ms"] else "off") if r_on and r_off else "-"])
    return _table(["H", "T", "B", "per-step (off) ms", "persistent (on) ms", "cuDNN ms", "on/off",
                   "on/cuDNN", "on fwd us/step", "faster"], rows)


def precision_table(f32, tf, bf) -> list[str]:
    rows = []
    for k in sorted(set(tf) | set(bf)):
        t, b, f = tf.get(k), bf.get(k), f32.get(k)
        rows.append([*k, _fmt(f["step_ms"]) if f else "-",
                     _fmt(t["step_ms"]) if t else "-", _fmt(t.get("torch_step_ms")) if t else "-",
                     _x(t.get("step_over_torch"), 1.0) if t else "-",
                     _fmt(b["step_ms"]) if b else "-", _fmt(b.get("torch_step_ms")) if b else "-",
                     _x(b.get("step_over_torch"), 1.0) if b else "-",
                     _x(_ratio(f["step_ms"], b["step_ms"])) if f and b else "-"])
    return _table(["H", "T", "B", "float32 ms", "tf32 ms", "cuDNN TF32 ms", "tf32/cuDNN", "bf16 ms",
                   "cuDNN autocast ms", "bf16/cuDNN", "float32/bf16"], rows)


def _not_ok(res, name) -> list[str]:
    if res is None:
        return []
    bad = [f"{name}: {r['backend']} H={r['H']} T={r['T']} B={r['B']}: {r['status']}: {r['note']}"
           for r in res["rows"] if r["status"] != "ok"]
    if res.get("meta", {}).get("partial"):
        bad.append(f"{name}: the run did not finish (partial: its time ran out or a check failed"
                   + (f": {res['meta']['check_failed']}" if res["meta"].get("check_failed") else "") + ")")
    return bad


def build(folder: str) -> str:
    shown = _shown(folder)
    session = _jsonl(folder, "session.jsonl")
    gpu = _json(folder, "gpu.json")
    machine = (gpu or {}).get("meta", {}).get("machine", {})
    lines = [f"# GPU session: issues 9-12 ({machine.get('gpu', 'GPU unknown')})", "",
             "Written by `benchmarks/gpu_readme.py` from the files in this folder, which "
             "`benchmarks/gpu_session.sh` wrote in one run. " + TARGETS_NOTE, "",
             "## Command", "", "```", f"bash benchmarks/gpu_session.sh {shown}", "```", ""]
    if session:
        lines += ["Parts (`session.jsonl`):", ""]
        lines += _table(["part", "status", "seconds", "budget s", "note"],
                        [[p["part"], p["status"], p["seconds"], p["budget"], p["note"] or ""] for p in session])
        lines.append("")
    else:
        lines += ["session.jsonl missing: the parts' outcomes are unknown.", ""]
    lines += ["## Machine", "", "```", (_read(folder, "machine.txt") or "machine.txt missing").rstrip(), "```", "",
              f"nvmath-python: {(_read(folder, 'nvmath.txt') or 'nvmath.txt missing').strip()}", ""]

    lines += ["## Targets of issues 9-12", ""]
    tg = targets(folder)
    lines += _table(["issue", "target", "measured", "verdict"], tg) + [""]

    tests = _jsonl(folder, "tests.jsonl")
    lines += ["## GPU tests (`pytest -m gpu`, one process per file; persistent kernels last, alone)", ""]
    if tests:
        lines += _table(["group", "file", "rc", "passed", "failed", "errors", "skipped", "seconds", "summary"],
                        [[t["group"], t["file"], t["rc"] if not t.get("timed_out") else f"{t['rc']} (timed out)",
                          t["passed"], t["failed"], t["errors"], t["skipped"], t["seconds"], t["summary"]]
                         for t in tests])
        lines += ["", "Logs: `pytest-<file>.txt`.", ""]
    else:
        pyt = _read(folder, "pytest_gpu.txt")
        last = [s for s in (pyt or "").splitlines() if s.strip()]
        lines += [f"`{last[-1]}` (log: `pytest_gpu.txt`)" if last else "tests.jsonl missing (not run)", ""]

    lines += ["## (a) Training step, NumPy vs CuPy vs cuDNN, ms (medians; forward + backward, no optimizer)", ""]
    npr = _json(folder, "numpy.json")
    if gpu is not None:
        rows, same_run = list(gpu["rows"]), None
        metas = [gpu.get("meta", {})]
        if npr is not None:      # NumPy's rows and the speedup of its own two-backend run
            have = {(r["layers"], r["H"], r["T"], r["B"]) for r in rows if r["backend"] == "numpy"}
            rows += [r for r in npr["rows"] if r["backend"] == "numpy"
                     and (r["layers"], r["H"], r["T"], r["B"]) not in have]
            same_run = {(r["layers"], r["H"], r["T"], r["B"]): r.get("speedup_vs_numpy")
                        for r in npr["rows"] if r["backend"] == "cupy" and r["status"] == "ok"}
            metas.append(npr.get("meta", {}))
        cmds = [m.get("command") for m in metas if m.get("command")]
        if cmds:
            lines += ["```"] + cmds + ["```", ""]
        lines += [f"{rows[0]['dtype'] if rows else ''}; input size = H; TF32 off for torch/cuDNN "
                  "(cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False; CuPy does not use TF32 unless "
                  "CUPY_TF32=1). Each cell's results were checked against torch, and CuPy against NumPy, "
                  "before timing. `CuPy / cuDNN` above 1 and a speedup below 1 are where CuPy loses."
                  + (" NumPy's rows and the speedup come from the two-backend run (`numpy.json`: NumPy "
                     "and CuPy in one process, ratio of that run); the other columns from `gpu.json`."
                     if npr is not None else ""), ""]
        lines += side_by_side(rows, same_run) + [""]
        if os.path.exists(os.path.join(folder, "gpu.png")):
            lines += ["![bench](gpu.png)", ""]
    else:
        lines += ["gpu.json missing (not measured)", ""]
    b256, off = _json(folder, "b256.json"), _json(folder, "graphs-off.json")
    lines += ["### CuPy cells in detail (grid above, then B=256)", "",
              "`floor`: the same GEMMs alone, timed as the step runs them (captured into a graph when "
              "the step's loop is: `floor captured`). Host us/step: host time of one forward / backward "
              "call (device idle before, not waited for after) per time step and layer.", ""]
    lines += cupy_detail([gpu, b256]) + [""]
    ln = _json(folder, "ln.json")
    lines += ["### LayerNorm cell vs plain cell, CuPy (graphs on; plain: the grid above, another run)", ""]
    if ln:
        a = _ok(gpu)
        lines += _table(["H", "T", "B", "LayerNorm step ms", "plain step ms", "LayerNorm/plain",
                         "host fwd us/step", "host bwd us/step", "check (max rel err vs NumPy float64)"],
                        [[*k, _fmt(r["step_ms"]), _fmt(a[k]["step_ms"]) if k in a else "-",
                          _x(_ratio(r["step_ms"], a[k]["step_ms"]), 1.5) if k in a else "-",
                          _fmt(r.get("host_fwd_us"), 1), _fmt(r.get("host_bwd_us"), 1),
                          f"{r['check_max_rel_err']:.1e}" if r.get("check_max_rel_err") is not None else "-"]
                         for k, r in sorted(_ok(ln).items())]) + [""]
    else:
        lines += ["ln.json missing (not measured)", ""]
    lines += ["### Eager (graphs off) vs replayed (graphs on), CuPy", ""]
    lines += (eager_vs_replay(gpu, off) if off else ["graphs-off.json missing (not measured)"]) + [""]

    lines += ["## (b) Persistent kernels (issue 11): per-step vs persistent vs cuDNN, float32", ""]
    p_off, p_on = _json(folder, "persistent-off.json"), _json(folder, "persistent-on.json")
    lines += (persistent_table(p_off, p_on) if p_off or p_on else ["persistent-{off,on}.json missing (not measured)"])
    lines += [""]

    lines += ["## (c) Precision modes (issue 12): CuPy vs cuDNN in the same mode", ""]
    tf, bf = _json(folder, "precision-tf32.json"), _json(folder, "precision-bf16.json")
    if tf or bf:
        lines += ["float32 from the bench part (TF32 off). cuDNN TF32: allow_tf32 on; cuDNN autocast: "
                  "torch.autocast(bfloat16).", ""]
        lines += precision_table({**_ok(gpu), **_ok(b256)}, _ok(tf), _ok(bf)) + [""]
    else:
        lines += [f"precision-{{tf32,bf16}}.json missing (not measured): "
                  f"{(_read(folder, 'nvmath.txt') or '').strip()}", ""]

    lines += ["## (d) `xlstm train --backend cupy` (the default run, short)", ""]
    tr = [(m, t) for m, t in ((m, _json(folder, f"train-{m}.json")) for m in ("float32", "bf16")) if t]
    if tr:
        lines += _table(["precision", "steps", "steps/s (steady)", "from step", "wall s (whole run)",
                         "final val loss", "rc", "note"],
                        [[m, t.get("steps", "-"), _fmt(t.get("steps_per_s"), 1), t.get("steady_from_step", "-"),
                          _fmt(t.get("wall_s"), 1), _fmt(t.get("final_val_loss"), 4), t.get("rc", "-"),
                          t.get("note", "")] for m, t in tr]) + [""]
    else:
        lines += ["train-*.json missing (not measured)", ""]

    emb = _read(folder, "embedding_grad.json")
    lines += ["## Embedding gradient: sort-segment vs one-hot GEMM vs atomic add.at", ""]
    if emb:
        lines += ["float32, medians (ms); ids with one id in a quarter of the positions; "
                  "`repeatable`: two identical calls gave the same bits.", ""]
        lines += embedding_table(json.loads(emb)) + [""]
    else:
        lines += ["embedding_grad.json missing (not measured)", ""]

    bad = []
    for name in ("gpu", "b256", "graphs-off", "ln", "numpy", "persistent-off", "persistent-on", "precision-tf32", "precision-bf16"):
        bad += _not_ok(_json(folder, name + ".json"), name)
    if bad:
        lines += ["## Cells not measured", ""] + [f"- {s}" for s in bad] + [""]
    return "\n".join(lines)


def targets_text(folder) -> str:
    rows = targets(folder)
    w = max(len(t[1]) for t in rows)
    return "\n".join(f"[{v:^12}] issue {i:>2}: {t:<{w}}  {m}" for i, t, m, v in rows)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--test-line"] and len(argv) == 8:
        record_test_file(*argv[1:])
        return 0
    if argv[:1] == ["--train-summary"] and len(argv) == 5:
        res = train_summary(*argv[1:])
        print(f"train {res['mode']}: {_fmt(res['steps_per_s'], 1)} steps/s, val loss {_fmt(res['final_val_loss'], 4)}")
        return 0
    if len(argv) != 1:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    text = build(argv[0])
    with open(os.path.join(argv[0], "README.md"), "w") as f:
        f.write(text + "\n")
    tt = targets_text(argv[0])
    with open(os.path.join(argv[0], "targets.txt"), "w") as f:
        f.write(tt + "\n")
    print(f"wrote {os.path.join(argv[0], 'README.md')} and targets.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
