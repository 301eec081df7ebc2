"""The GPU session: every part of ``benchmarks/gpu_plan.py`` in one device call, then its report.

    python -m benchmarks.gpu_session [OUT] [--parts smoke,tests,...] [--dry-run --python CMD]

OUT defaults to ``benchmarks/results/gpu-h200``. Each step runs as its own process under its cap
(and never past the session's budget, ``gpu_plan.TOTAL_SECONDS``, less the report's share);
its files are on disk as it ends (a bench step's JSON after every cell), its outcome is a line
of ``OUT/session.jsonl`` (done / failed / timeout / skipped, seconds, cap, why), and a gpu test
step's counts a line of ``OUT/tests.jsonl`` (with ``<step>.xml``, pytest's JUnit report). The
smoke part decides the later parts' environment: graphs off, persistent kernels off, or a
step skipped for want of cupy / nvmath-python, each said in its record. A step that fails
(a check that disagrees, a step past its cap) is
recorded and the session goes on. The report (``benchmarks/gpu_report.py``) is written last,
and its targets printed, so they end the device call's output.

``--parts`` reruns some parts into the same OUT (the records are appended; the report takes
each step's latest). ``--dry-run`` runs the same steps with the plan's small sizes and pytest
collecting only, for a rehearsal on the CPU against the stand-in cupy (``--python`` names the
interpreter command that installs it); its report reads NOT MEASURED throughout.
Exit status: 0 when every step that ran finished cleanly, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):                 # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_plan, gpu_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join("benchmarks", "results", "gpu-h200")
BENCH_SLACK_S = 8          # a bench step's --budget is its grant less this (start-up, final files)
MIN_STEP_S = 5             # a step granted less than this (or its cap) is skipped


def _append(path, rec):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def read_smoke(out) -> dict:
    path = os.path.join(out, "smoke.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def environment(smoke: dict) -> tuple[dict, dict]:
    """(environment for the later steps, {need: why unusable}) from the smoke part's results.

    A need the smoke part did not reach (it ended early) counts as unusable; with no smoke
    results at all (a rerun without the part) nothing is assumed broken."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    broken = {}
    if not smoke:
        return env, broken
    for need in gpu_plan.NEEDS:
        state = smoke.get(need, "not checked: the smoke part ended before this check")
        if state != "ok":
            broken[need] = state
    if "graphs" in broken:
        env["XLSTM_CUDA_GRAPHS"] = "0"
    if "persistent" in broken:
        env["XLSTM_PERSISTENT"] = "off"
    return env, broken


def command(step, out, python, grant, dry_run, tmp) -> list:
    """The argv of ``step``."""
    args = list(step.dry_args if dry_run and step.dry_args is not None else step.args)
    if step.kind == "smoke":
        return [*python, "-m", "benchmarks.gpu_smoke", out]
    if step.kind == "pytest":
        return [*python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE",
                f"--junitxml={os.path.join(out, step.name + '.xml')}", *(["--collect-only"] if dry_run else []),
                *args]
    if step.kind == "bench":
        budget = max(grant - BENCH_SLACK_S, 5)
        return [*python, "-m", "xlstm", "bench", "--backends", "cupy", "--no-progress", "--out", out,
                "--name", step.name, "--budget", f"{budget:g}", *args]
    if step.kind == "train":
        return [*python, "-m", "xlstm", "train", "--backend", "cupy", "--no-progress",
                "--out", os.path.join(tmp, step.name), *args]
    raise ValueError(f"step {step.name}: unknown kind {step.kind!r}")


def run_process(argv, env, timeout, log_path) -> tuple[int, bool]:
    """(exit status, timed out): ``argv`` in its own process group, stdout+stderr to log_path;
    past ``timeout`` the whole group is killed (a bench and what it started)."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(a) for a in argv) + "\n")
        log.flush()
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=True)
        try:
            return p.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=3)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return p.returncode if p.returncode is not None else -9, True


def _last_line(path) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [s.strip() for s in f if s.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def after_step(step, out, rc, seconds, timed_out, tmp, dry_run) -> str:
    """Files a step leaves beside its log (tests.jsonl line, train summary); returns a note."""
    if step.kind == "pytest":
        rec = gpu_report.record_tests(step, out, rc, seconds, timed_out, collect_only=dry_run)
        _append(os.path.join(out, "tests.jsonl"), rec)
        return rec["summary"]
    if step.kind == "train":
        src = os.path.join(tmp, step.name, "metrics.jsonl")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out, step.name + "-metrics.jsonl"))
        res = gpu_report.train_summary(out, step.name, rc)
        return f"{gpu_report.fmt(res['steps_per_s'], 1)} steps/s, val loss {gpu_report.fmt(res['final_val_loss'], 4)}"
    return ""


def run_session(out, parts=None, python=None, dry_run=False, total=None) -> int:
    """Runs the plan's ``parts`` (default: all) into ``out``; returns the exit status."""
    python = list(python or [sys.executable])
    total = gpu_plan.TOTAL_SECONDS if total is None else total
    names = [p.name for p in gpu_plan.PARTS]
    parts = names if not parts else list(parts)
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; the parts: {', '.join(names)}")
    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    if "smoke" in parts:          # a new session: its records start empty (a rerun appends)
        for f in ("session.jsonl", "tests.jsonl", "smoke.json"):
            if os.path.exists(os.path.join(out, f)):
                os.remove(os.path.join(out, f))
    t0 = time.monotonic()
    meta = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": parts,
            "dry_run": dry_run, "total_seconds": total, "python": python,
            "command": "python -m benchmarks.gpu_session " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
    _append(os.path.join(out, "session.jsonl"), {"session": meta})
    print(f"== GPU session: parts {', '.join(parts)}; budget {total} s; files under {out}", flush=True)
    status = 0
    with tempfile.TemporaryDirectory(prefix="xlstm-session-") as tmp:
        for part in gpu_plan.PARTS:
            if part.name not in parts:
                continue
            for step in part.steps:
                env, broken = environment(read_smoke(out))
                elapsed = time.monotonic() - t0
                reserve = 0 if step.kind == "report" else gpu_plan.REPORT_SECONDS
                grant = min(step.cap_s, total - reserve - elapsed)
                rec = {"part": part.name, "step": step.name, "cap": step.cap_s, "estimate": step.estimate_s,
                       "grant": round(max(grant, 0), 1), "env": {k: env[k] for k in ("XLSTM_CUDA_GRAPHS",
                                                                                  "XLSTM_PERSISTENT") if k in env}}
                missing = [n for n in step.needs if n in broken]
                if missing:
                    why = "; ".join(f"{n}: {broken[n]}" for n in missing)
                    rec.update(status="skipped", rc=None, seconds=0, note=f"NOT MEASURED: the smoke part found {why}")
                elif step.kind != "report" and grant < min(MIN_STEP_S, step.cap_s):
                    rec.update(status="skipped", rc=None, seconds=0,
                               note=f"NOT MEASURED: {max(grant, 0):.0f} s left of the session's {total} s")
                elif step.kind == "report":
                    t1 = time.monotonic()
                    gpu_report.write(out)
                    rec.update(status="done", rc=0, seconds=round(time.monotonic() - t1, 1), note="")
                else:
                    t1 = time.monotonic()
                    argv = command(step, out, python, grant, dry_run, tmp)
                    print(f"== {part.name}/{step.name}: up to {grant:.0f} s (session at {elapsed:.0f} s)", flush=True)
                    rc, timed_out = run_process(argv, env, grant, os.path.join(out, step.name + ".txt"))
                    secs = time.monotonic() - t1
                    note = after_step(step, out, rc, secs, timed_out, tmp, dry_run)
                    st = "timeout" if timed_out else ("done" if rc == 0 else "failed")
                    if step.kind == "pytest" and rc == 5:
                        note = "no gpu test collected: the file's gpu tests are gone or renamed" + \
                            (f" ({note})" if note else "")
                    if st != "done" and not note:
                        note = _last_line(os.path.join(out, step.name + ".txt"))
                    rec.update(status=st, rc=rc, seconds=round(secs, 1), note=note)
                if step.kind != "report":
                    _append(os.path.join(out, "session.jsonl"), rec)
                if rec["status"] in ("failed", "timeout"):
                    status = 1
                print(f"== {step.name}: {rec['status']} ({rec['seconds']} s of {rec['grant']} s)"
                      + (f": {rec['note']}" if rec["note"] else ""), flush=True)
    print(f"== session: {time.monotonic() - t0:.0f} s; files under {out}")
    targets = os.path.join(out, "targets.txt")
    if os.path.exists(targets):
        with open(targets) as f:
            print(f.read(), end="")
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"folder of the session's files (default {DEFAULT_OUT})")
    ap.add_argument("--parts", default=None, help="comma-separated parts to run (default all): "
                    + ", ".join(p.name for p in gpu_plan.PARTS))
    ap.add_argument("--dry-run", action="store_true",
                    help="the plan's small sizes, pytest collecting only; the report measures nothing")
    ap.add_argument("--python", default=None, help="interpreter command for the steps (default this Python)")
    ap.add_argument("--total", type=float, default=None, help=f"session budget in s (default {gpu_plan.TOTAL_SECONDS})")
    a = ap.parse_args(argv)
    return run_session(a.out, a.parts.split(",") if a.parts else None,
                       shlex.split(a.python) if a.python else None, a.dry_run, a.total)


if __name__ == "__main__":
    sys.exit(main())
