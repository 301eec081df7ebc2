"""Regenerate the README's figures about the main job and the command line, with where they came from.

    python benchmarks/readme_figures.py                       # every part (about 6-10 minutes on 2 cores)
    python benchmarks/readme_figures.py --only trace,nproc    # some parts; the others stay as they were

Parts (each stamped with its machine, Python, NumPy, commit and date):
    quickstart  `xlstm train --out DIR --no-progress` (the README's main job, NumPy): steps, seconds
                (as the run prints them), wall seconds and peak RSS of the process, final validation
                loss, the corpus's unigram entropy
    precision   the same run with --precision tf32 and bf16 (float32 is the quick-start run):
                validation loss at steps 100, 200, 400, 600, 800
    nproc       `xlstm train --steps 60 --eval-tokens 2000 [--nproc 2]`, alternated: tokens/s over
                steps 10-60 (from metrics.jsonl) and wall seconds of each run
    trace       the output of `xlstm trace`

Writes benchmarks/results/readme-figures.json; tests/test_readme.py checks that the README states
these numbers (times are compared with this file, not measured again).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "readme-figures.json")
PARTS = ("quickstart", "precision", "nproc", "trace")
PRECISION_STEPS = (100, 200, 400, 600, 800)


def machine() -> dict:
    import numpy as np

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "commit": commit, "dirty": dirty, "load_before": load,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def xlstm(*argv, env=None):
    """(stdout, wall seconds, peak RSS in bytes or None) of one `xlstm` command, run as a user runs it."""
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), XLSTM_BACKEND="numpy")
    e.update(env or {})
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "xlstm", *map(str, argv)], stdout=out, stderr=err, env=e)
        rss = None
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(p.pid, 0)       # this child's own peak RSS (Linux: kilobytes)
            p.returncode, rss = os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024
        else:
            p.wait()
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode:
        raise SystemExit(f"xlstm {' '.join(map(str, argv))} failed ({p.returncode}):\n{stderr}")
    return stdout, wall, rss


def _records(run, split):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("split") == split]


def _train(run, *extra):
    out, wall, rss = xlstm("train", "--out", run, "--no-progress", *extra)
    m = re.search(r"done: (\d+) steps in ([\d.]+) s", out)
    val = _records(run, "val")
    with open(os.path.join(run, "latest")) as f:
        latest = f.read().strip()
    with open(os.path.join(run, latest, "meta.json")) as f:
        meta = json.load(f)
    return {"steps": int(m.group(1)), "seconds": float(m.group(2)), "wall_s": round(wall, 1),
            "peak_rss_bytes": rss, "val_loss": val[-1]["loss"], "val_by_step": {r["step"]: r["loss"] for r in val},
            "unigram_entropy": meta["unigram_entropy"], "stdout": out}


def quickstart(tmp):
    r = _train(os.path.join(tmp, "quickstart"))
    r["command"] = "xlstm train --out DIR --no-progress"
    return r


def precision(tmp, float32_run):
    rows = {"float32": {s: float32_run["val_by_step"][s] for s in PRECISION_STEPS}}
    for mode in ("tf32", "bf16"):
        r = _train(os.path.join(tmp, mode), "--precision", mode)
        rows[mode] = {s: r["val_by_step"][s] for s in PRECISION_STEPS}
    return {"command": "xlstm train --precision MODE --out DIR --no-progress", "val_loss": rows}


def nproc(tmp, repeats=2):
    runs = {"1": [], "2": []}
    for i in range(repeats):
        for n in ("1", "2"):            # alternated, so a change in the machine's load hits both
            run = os.path.join(tmp, f"nproc{n}-{i}")
            extra = ["--nproc", "2"] if n == "2" else []
            _, wall, _ = xlstm("train", "--steps", "60", "--eval-tokens", "2000", "--out", run, "--no-progress",
                               *extra, env={"OMP_NUM_THREADS": "1"})
            tr = [r for r in _records(run, "train") if r["step"] >= 10]
            tokens = (tr[-1]["step"] - tr[0]["step"]) * 32 * 64         # steps of --batch 32 x --seq-len 64
            secs = tr[-1]["elapsed_s"] - tr[0]["elapsed_s"]
            runs[n].append({"tokens_per_s": round(tokens / secs), "wall_s": round(wall, 1)})
    return {"command": "xlstm train --steps 60 --eval-tokens 2000 [--nproc 2]", "runs": runs}


def trace(tmp):
    out, _, _ = xlstm("trace")
    return {"command": "xlstm trace", "stdout": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    args = p.parse_args(argv)
    parts = [s for s in args.only.split(",") if s]
    bad = set(parts) - set(PARTS)
    if bad:
        p.error(f"unknown parts {sorted(bad)}; choose from {PARTS}")
    if "precision" in parts and "quickstart" not in parts:
        p.error("precision reuses the quick-start run as its float32 row: give quickstart too")
    try:
        with open(OUT) as f:
            results = json.load(f)
    except (OSError, ValueError):
        results = {}
    with tempfile.TemporaryDirectory(prefix="readme-figures-") as tmp:
        for part in parts:
            stamp = machine()
            print(f"{part} ...", file=sys.stderr, flush=True)
            if part == "quickstart":
                value = quickstart(tmp)
            elif part == "precision":
                value = precision(tmp, results["quickstart"])
            elif part == "nproc":
                value = nproc(tmp)
            else:
                value = trace(tmp)
            results[part] = {**value, "machine": stamp}
            os.makedirs(os.path.dirname(OUT), exist_ok=True)
            with open(OUT, "w") as f:       # after each part: a long run keeps what it measured
                json.dump(results, f, indent=1, sort_keys=True)
                f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
