"""The GPU session's report: ``OUT/README.md`` and ``OUT/targets.txt`` from the files in OUT.

    python -m benchmarks.gpu_report benchmarks/results/gpu-h200

Reads what is present of the session's files (``session.jsonl``, ``smoke.json``,
``machine.txt``, ``tests.jsonl`` with the JUnit ``.xml`` of each test step, the bench JSON of
each bench step, ``train-*.json``) through the public bench report API
(``xlstm.bench.report``), and the NumPy column from this repository's committed CPU run
(``gpu_plan.NUMPY_RESULTS``). Every target of ``gpu_plan.TARGETS`` is stated as MET /
NOT MET / NOT MEASURED with the measured values; a missing input is said to be missing, never
filled in. A dry run's report (``session.jsonl`` says so) states every target NOT MEASURED:
the stand-in cupy runs the kernels on the host, so nothing it times is a GPU figure.
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

if __package__ in (None, ""):                 # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_plan  # noqa: E402
from xlstm.bench.report import fmt, load, ok_rows, ratio  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MET, NOT_MET, NOT_MEASURED = "MET", "NOT MET", "NOT MEASURED"


# -- what the steps leave ---------------------------------------------------------------------
def _jsonl(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def _json(folder, name):
    return load(os.path.join(folder, name))


def junit_outcomes(path) -> dict:
    """{"file.py::test_name[params]": "passed" | "failed" | "error" | "skipped"} of a JUnit XML."""
    if not os.path.exists(path):
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {}
    out = {}
    for tc in root.iter("testcase"):
        file = tc.get("classname", "").split(".")[-1] + ".py"
        kind = next((c.tag for c in tc if c.tag in ("failure", "error", "skipped")), "passed")
        out[f"{file}::{tc.get('name')}"] = {"failure": "failed"}.get(kind, kind)
    return out


def record_tests(step, out, rc, seconds, timed_out, collect_only=False) -> dict:
    """One line of tests.jsonl for a pytest step: counts from its JUnit XML, or what its log says."""
    outcomes = junit_outcomes(os.path.join(out, step.name + ".xml"))
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failed", "error", "skipped")}
    rec = dict(step=step.name, selection=" ".join(step.args), rc=rc, seconds=round(seconds, 1),
               timed_out=timed_out, collect_only=collect_only, **counts)
    log = os.path.join(out, step.name + ".txt")
    last = ""
    if os.path.exists(log):
        with open(log, errors="replace") as f:
            lines = [s.strip() for s in f if s.strip()]
        last = lines[-1].strip("= ") if lines else ""
    rec["summary"] = ("timed out: " if timed_out else "") + (last or "(no output)")
    return rec


def train_summary(out, name, rc) -> dict:
    """``<name>.json`` from the run's metrics: steady steps/s (from the first logged step at or
    past a third of the run to the last, so start-up and capture stay out), final val loss."""
    recs = _jsonl(os.path.join(out, name + "-metrics.jsonl"))
    train = [r for r in recs if r.get("split") == "train"]
    val = [r for r in recs if r.get("split") == "val"]
    res = dict(name=name, rc=rc, steps=train[-1]["step"] if train else None, steps_per_s=None,
               final_val_loss=val[-1]["loss"] if val else None)
    if train:
        start = [r for r in train if r["step"] >= train[-1]["step"] // 3]
        if len(start) >= 2 and start[-1]["elapsed_s"] > start[0]["elapsed_s"]:
            res["steps_per_s"] = ((start[-1]["step"] - start[0]["step"])
                                  / (start[-1]["elapsed_s"] - start[0]["elapsed_s"]))
            res["steady_from_step"] = start[0]["step"]
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def session_records(folder) -> tuple[list, dict]:
    """(the latest record of each step, in plan order; the last session's meta)."""
    latest, meta = {}, {}
    for r in _jsonl(os.path.join(folder, "session.jsonl")):
        if "session" in r:
            meta = r["session"]
        else:
            latest[r["step"]] = r
    order = [s.name for _, s in gpu_plan.steps()]
    return [latest[n] for n in order if n in latest], meta


# -- targets ----------------------------------------------------------------------------------
def _metric(row, metric):
    if metric == "host_us":
        vals = [row.get("host_fwd_us"), row.get("host_bwd_us")]
        return None if None in vals else max(vals)
    if metric == "step_over_captured_floor":
        return row.get("step_over_floor") if row.get("floor_captured") else None
    return row.get(metric)


def bench_verdict(target, folder) -> tuple[str, str]:
    """(measured, verdict) of a bench target: the best CuPy path per cell over its sources."""
    best = {}
    for src in target.sources:
        for cell, row in ok_rows(_json(folder, src + ".json")).items():
            if cell not in target.cells:
                continue
            v = _metric(row, target.metric)
            if v is not None and (cell not in best or v < best[cell][0]):
                best[cell] = (v, src)
    if not best:
        return "-", NOT_MEASURED
    shown = ", ".join(f"H={c[0]} T={c[1]}: {v:.2f}{target.unit}"
                      + (f" ({s})" if len(target.sources) > 1 else "") for c, (v, s) in sorted(best.items()))
    if any(v > target.limit for v, _ in best.values()):
        return shown, NOT_MET
    if len(best) < len(target.cells):
        return f"{shown} ({len(best)} of {len(target.cells)} cells)", NOT_MEASURED
    return shown, MET


def tests_verdict(target, folder) -> tuple[str, str]:
    outcomes = {}
    for r in _jsonl(os.path.join(folder, "tests.jsonl")):
        outcomes.update(junit_outcomes(os.path.join(folder, r["step"] + ".xml")))
    got = {k: v for k, v in outcomes.items() if any(k.split("[")[0] == t for t in target.tests)}
    ran = {k: v for k, v in got.items() if v != "skipped"}
    if not ran:
        return ("skipped: " + ", ".join(sorted(got))) if got else "-", NOT_MEASURED
    bad = sorted(k for k, v in ran.items() if v != "passed")
    text = f"{len(ran) - len(bad)} of {len(ran)} passed" + (f"; not passed: {', '.join(bad)}" if bad else "")
    if bad:
        return text, NOT_MET
    missing = [t for t in target.tests if not any(k.split("[")[0] == t for k in ran)]
    return (text + f"; not run: {', '.join(missing)}", NOT_MEASURED) if missing else (text, MET)


def targets(folder) -> list:
    """[(target, measured, verdict)] for every target of the plan."""
    _, meta = session_records(folder)
    out = []
    for t in gpu_plan.TARGETS:
        if meta.get("dry_run"):
            out.append((t, "dry run on the CPU stand-in: no GPU figure", NOT_MEASURED))
            continue
        out.append((t, *(bench_verdict(t, folder) if t.metric else tests_verdict(t, folder))))
    return out


# -- tables -----------------------------------------------------------------------------------
def _table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _x(v, limit=None):
    if v is None:
        return "-"
    return f"**{v:.2f}x**" if limit is not None and v > limit else f"{v:.2f}x"


def record_table(folder) -> list:
    """CuPy vs cuDNN at B=64 with the GEMM floor, host time and the NumPy column (committed CPU run)."""
    rec = ok_rows(_json(folder, "record.json"))
    npres = load(os.path.join(ROOT, gpu_plan.NUMPY_RESULTS))
    numpy = {}
    for r in (npres or {}).get("rows", []):
        if r["backend"] == "numpy" and r["status"] == "ok" and r["layers"] == 1:
            numpy[(r["H"], r["T"])] = r
    rows = []
    for (H, T, B), r in sorted(rec.items()):
        n = numpy.get((H, T))
        rows.append([H, T, B, fmt(r["step_ms"]), fmt(r.get("torch_step_ms")), _x(r.get("step_over_torch")),
                     fmt(r.get("floor_step_ms")), {True: "yes", False: "no"}.get(r.get("floor_captured"), "-"),
                     _x(r.get("step_over_floor")), fmt(r.get("host_fwd_us"), 1), fmt(r.get("host_bwd_us"), 1),
                     r.get("cuda_graphs") or "-",
                     f"{fmt(n['step_ms'])} (B={n['B']})" if n else "-",
                     f"{ratio(r['step_tokens_per_s'], n['step_tokens_per_s']):.0f}x" if n else "-"])
    return _table(["H", "T", "B", "CuPy step ms", "cuDNN step ms", "CuPy/cuDNN", "GEMM floor ms", "floor captured",
                   "step/floor", "host fwd us/step", "host bwd us/step", "graphs", "NumPy step ms (CPU)",
                   "CuPy/NumPy tokens/s"], rows)


def pair_table(folder, a, b, label_a, label_b) -> list:
    """Two bench steps side by side per cell (step ms, its cuDNN, ratio), and a / b."""
    ra, rb = ok_rows(_json(folder, a + ".json")), ok_rows(_json(folder, b + ".json"))
    rows = []
    for k in sorted(set(ra) | set(rb)):
        x, y = ra.get(k), rb.get(k)
        rows.append([*k, fmt(x["step_ms"]) if x else "-", _x(x.get("step_over_torch")) if x else "-",
                     fmt(y["step_ms"]) if y else "-", _x(y.get("step_over_torch")) if y else "-",
                     _x(ratio(y["step_ms"], x["step_ms"])) if x and y else "-",
                     fmt((y or x).get("torch_step_ms"))])
    return _table(["H", "T", "B", f"{label_a} ms", f"{label_a}/cuDNN", f"{label_b} ms", f"{label_b}/cuDNN",
                   f"{label_b}/{label_a}", "cuDNN ms"], rows)


def single_table(folder, name) -> list:
    rows = [[*k, fmt(r["step_ms"]), fmt(r.get("torch_step_ms")), _x(r.get("step_over_torch")),
             fmt(r.get("host_fwd_us"), 1), fmt(r.get("host_bwd_us"), 1),
             f"{r['check_max_rel_err']:.1e}" if r.get("check_max_rel_err") is not None else "-"]
            for k, r in sorted(ok_rows(_json(folder, name + ".json")).items())]
    return _table(["H", "T", "B", "step ms", "torch step ms", "step/torch", "host fwd us/step",
                   "host bwd us/step", "check (max rel err)"], rows)


def not_ok(folder) -> list:
    out = []
    for _, s in gpu_plan.steps():
        res = _json(folder, s.name + ".json") if s.kind == "bench" else None
        for r in (res or {}).get("rows", []):
            if r["status"] != "ok":
                out.append(f"{s.name}: {r['backend']} H={r['H']} T={r['T']} B={r['B']}: {r['status']}: {r['note']}")
        if res and res.get("meta", {}).get("partial"):
            out.append(f"{s.name}: the run did not finish (its time ran out)")
    return out


def build(folder) -> str:
    recs, meta = session_records(folder)
    smoke = _json(folder, "smoke.json") or {}
    device = smoke.get("device", "GPU unknown")
    lines = [f"# GPU session: {device}", ""]
    if meta.get("dry_run"):
        lines += ["**Dry run on the CPU against the stand-in cupy** (host-built kernels, no GPU): the "
                  "files show that every part runs and writes its files; no figure here is a GPU "
                  "measurement, and every target reads NOT MEASURED.", ""]
    lines += ["Written by `benchmarks/gpu_report.py` from the files in this folder, which "
              "`python -m benchmarks.gpu_session` wrote (plan: `benchmarks/gpu_plan.py`, budget "
              f"{gpu_plan.TOTAL_SECONDS} s). The device command is in "
              "[benchmarks/results/README.md](../README.md).", ""]
    if meta:
        lines += [f"Started {meta.get('started_utc', '?')}: `{meta.get('command', '')}`", ""]
    lines += ["## Targets", ""]
    lines += _table(["target", "measured", "verdict"], [[t.text, m, f"**{v}**"] for t, m, v in targets(folder)])
    lines += ["", "## Parts", ""]
    if recs:
        lines += _table(["part", "step", "status", "seconds", "cap s", "estimate s", "environment", "note"],
                        [[r["part"], r["step"], r["status"], r["seconds"], r["cap"], r["estimate"],
                          " ".join(f"{k}={v}" for k, v in r.get("env", {}).items()) or "-",
                          (r.get("note") or "").replace("|", "/")] for r in recs])
    else:
        lines += ["session.jsonl missing: the parts' outcomes are unknown."]
    lines += ["", "## Machine and smoke part", "", "```",
              (_read(folder, "machine.txt") or "machine.txt missing").rstrip(), "```", ""]
    lines += [f"- {k}: {smoke[k]}" for k in ("cupy", "nvmath", "graphs", "persistent") if k in smoke] or \
        ["smoke.json missing"]
    tests = _jsonl(os.path.join(folder, "tests.jsonl"))
    lines += ["", "## GPU tests (most valuable first; logs `<step>.txt`, JUnit `<step>.xml`)", ""]
    lines += _table(["step", "selection", "rc", "passed", "failed", "errors", "skipped", "seconds", "summary"],
                    [[t["step"], t["selection"], t["rc"], t["passed"], t["failed"], t["error"], t["skipped"],
                      t["seconds"], t["summary"].replace("|", "/")] for t in tests]) if tests else ["not run"]
    lines += ["", "## Numbers of record: CuPy vs cuDNN, float32, TF32 off, B=64, 1 layer", "",
              "Graphs on, per-step kernels (the persistent ones: crossover below). `host us/step`: host time "
              "of one forward / backward call per time step, the device idle before it. NumPy: the "
              f"committed CPU run `{gpu_plan.NUMPY_RESULTS}` (2 vCPUs, B=32), not timed here; the last "
              "column compares tokens per second.", ""]
    lines += record_table(folder) if ok_rows(_json(folder, "record.json")) else ["record.json missing (not measured)"]
    lines += ["", "### LayerNorm cell (checked against the NumPy backend in float64)", ""]
    lines += single_table(folder, "layernorm") if ok_rows(_json(folder, "layernorm.json")) else ["not measured"]
    lines += ["", "## tf32 and bf16 next to cuDNN TF32 / torch.autocast(bf16)", ""]
    lines += pair_table(folder, "precision-tf32", "precision-bf16", "tf32", "bf16")
    lines += ["", "## Persistent kernels: crossover (per-step off vs persistent on)", ""]
    lines += pair_table(folder, "crossover-off", "crossover-on", "per-step", "persistent")
    lines += ["", "## Short training runs (`xlstm train --backend cupy`)", ""]
    tr = [(s.name, _json(folder, s.name + ".json")) for _, s in gpu_plan.steps() if s.kind == "train"]
    lines += _table(["run", "steps", "steps/s (steady)", "final val loss", "rc"],
                    [[n, t.get("steps"), fmt(t.get("steps_per_s"), 1), fmt(t.get("final_val_loss"), 4), t.get("rc")]
                     for n, t in tr if t]) if any(t for _, t in tr) else ["not measured"]
    lines += ["", "## xlstm.torch.LSTM beside torch.nn.LSTM", ""]
    lines += single_table(folder, "torch-module") if ok_rows(_json(folder, "torch-module.json")) else \
        ["not measured" + next((f": {r['note']}" for r in recs if r["step"] == "torch-module" and r.get("note")), "")]
    bad = not_ok(folder)
    if bad:
        lines += ["", "## Cells not measured", ""] + [f"- {s}" for s in bad]
    return "\n".join(lines) + "\n"


def _read(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        return f.read()


def targets_text(folder) -> str:
    rows = targets(folder)
    return "\n".join(f"[{v:^12}] {t.text}: {m}" for t, m, v in rows) + "\n"


def write(folder) -> None:
    """README.md and targets.txt of the session folder."""
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(build(folder))
    with open(os.path.join(folder, "targets.txt"), "w") as f:
        f.write(targets_text(folder))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    write(argv[0])
    print(f"wrote {os.path.join(argv[0], 'README.md')} and targets.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
