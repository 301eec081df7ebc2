"""``xlstm bench`` / ``python -m benchmarks``: the arguments and the run over the cells."""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

from ..errors import InputError, XlstmError
from .cells import BenchCheckError, Cell, CellRunner, _empty_row, bench_cell
from .machine import _try_import_torch, machine_info
from .report import format_table, markdown_table, write_outputs
from .timing import Planner

FULL_HIDDEN = (64, 128, 256, 512, 1024, 2048)
FULL_SEQ = (16, 64, 256)
QUICK_HIDDEN = (64, 256)
QUICK_SEQ = (16, 64)


def _parse_ints(text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in str(text).replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _progress(total, enabled):
    """A tqdm bar on a terminal; None (plain progress lines) when piped or tqdm is missing."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="xlstm bench", unit="cell", file=sys.stderr, dynamic_ncols=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"a small subset (H {QUICK_HIDDEN}, T {QUICK_SEQ}, 1 layer) in well under a minute")
    parser.add_argument("--hidden", type=_parse_ints, default=None, help="hidden sizes, e.g. 64,256")
    parser.add_argument("--seq-len", type=_parse_ints, default=None, help="sequence lengths, e.g. 16,64")
    parser.add_argument("--batch", type=_parse_ints, default=(32,), help="batch size(s), default 32")
    parser.add_argument("--layers", type=_parse_ints, default=None, help="layer counts, default 1,2")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--precision", choices=("float32", "tf32", "bf16"), default="float32",
                        help="GEMM operand precision of xlstm (float32 accumulation) and of torch's side: "
                             "tf32 = cuDNN/cuBLAS TF32 on, bf16 = torch.autocast(bfloat16); on the numpy "
                             "backend an emulation, slower than float32 (default float32)")
    parser.add_argument("--backends", default="available",
                        help="comma-separated backends (numpy,cupy) or 'available' (default)")
    parser.add_argument("--no-torch", action="store_true", help="do not time torch even when installed")
    parser.add_argument("--torch-module", action="store_true",
                        help="time a training step of xlstm.torch.LSTM beside torch.nn.LSTM on one device")
    parser.add_argument("--layer-norm", action="store_true",
                        help="the LayerNorm LSTM cell (torch has none: not timed; results checked against "
                             "the NumPy backend in float64)")
    parser.add_argument("--cuda-graphs", choices=("on", "off"), default=None,
                        help="CuPy: replay each layer's time loop as a CUDA graph (on) or run it eagerly "
                             "(off); default: the backend's setting (XLSTM_CUDA_GRAPHS, on)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for NumPy's BLAS (via threadpoolctl) and torch; default: leave as is")
    parser.add_argument("--repeat", type=int, default=None, help="at most this many timed calls per contender and cell")
    parser.add_argument("--min-repeat", type=int, default=3, help="at least this many timed calls per contender")
    parser.add_argument("--rounds", type=int, default=4,
                        help="timed calls of each contender are split over this many interleaved blocks")
    parser.add_argument("--settle", type=float, default=0.12,
                        help="seconds of sleep before each timed block, so the previous library's "
                             "worker threads stop spinning (default 0.12)")
    parser.add_argument("--target-seconds", type=float, default=None,
                        help="aim for about this many seconds of timing per contender and cell")
    parser.add_argument("--max-cell-seconds", type=float, default=None,
                        help="skip a cell estimated to take longer (default 150, quick 20)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; cells that would not fit are skipped (default 840, quick 45)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--persistent", choices=("auto", "on", "off"), default=None,
                        help="CuPy: force the persistent kernels (on), the per-step kernels (off), or "
                             "let the crossover table pick (auto); default XLSTM_PERSISTENT, else off")
    parser.add_argument("--out", default=None,
                        help="folder for JSON/CSV/PNG (default: a new run folder runs/bench-NNN under the "
                             "current directory)")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default bench-<backends>[-quick])")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--markdown", action="store_true",
                        help="with --load: print the summary as Markdown tables (for a README)")
    parser.add_argument("--load", nargs="+", default=None, metavar="JSON",
                        help="do not run: print the table from saved JSON results (several files are "
                             "merged, e.g. a CPU and a GPU run); with --name also write them (JSON, CSV, PNG)")


def _warm_up_process(backends, args, torch):
    """One tiny untimed cell per backend first: imports, first-call set-up and thread pools.
    A backend that refuses or fails the tiny cell (a forced path that does not fit it, a
    check that disagrees) is left to say so in the grid's own cells."""
    for be in backends:
        try:
            r = CellRunner(Cell(8, 4, 2, 1), be, args.dtype, torch, seed=args.seed, use_torch=not args.no_torch,
                           precision=args.precision, layer_norm=args.layer_norm)
            r.check()
            for c in r.contenders():
                c.fn()
        except XlstmError as e:
            print(f"xlstm bench: warm-up of {be.name} refused ({type(e).__name__}: {e})", file=sys.stderr)


def new_run_dir() -> str:
    """runs/bench-NNN under the current directory (never beside the committed results)."""
    from ..app.checkpoint import new_run_dir as new

    return new("bench")


def _resolve_backends(spec: str):
    from xlstm.backends import available_backends, resolve

    names = available_backends() if spec == "available" else [s.strip() for s in spec.split(",") if s.strip()]
    return [resolve(n) for n in names]


def _apply_threads(n, torch):
    if n is None:
        return None
    if torch is not None:
        torch.set_num_threads(n)
    from ..backends import blas

    limit = blas.limit_threads(n)
    if limit is None:
        print("xlstm bench: no BLAS thread control found; NumPy's BLAS threads left as they are",
              file=sys.stderr)
    return limit


def run(args) -> int:
    """The dispatch point: ``--load`` prints saved results; otherwise the grid is run."""
    if args.load:
        return _run_load(args)
    if args.torch_module:
        from .timing import time_interleaved
        from .torch_module import run as run_torch_module

        args.out = args.out or new_run_dir()
        return run_torch_module(args, time_interleaved)
    return _run_grid(args)


def _run_grid(args) -> int:
    if getattr(args, "precision", "float32") != "float32" and args.dtype != "float32":
        raise InputError(f"--precision {args.precision} rounds float32 GEMM operands, so it needs --dtype float32 "
                         f"(got --dtype {args.dtype})")
    quick = args.quick
    hidden = args.hidden or (QUICK_HIDDEN if quick else FULL_HIDDEN)
    seqs = args.seq_len or (QUICK_SEQ if quick else FULL_SEQ)
    layers = args.layers or ((1,) if quick else (1, 2))
    args.repeat = args.repeat or (7 if quick else 25)
    args.target_seconds = args.target_seconds if args.target_seconds is not None else (0.1 if quick else 0.6)
    args.max_cell_seconds = args.max_cell_seconds or (20.0 if quick else 150.0)
    args.budget = args.budget or (45.0 if quick else 840.0)
    backends = _resolve_backends(args.backends)
    for be in backends:
        if args.cuda_graphs is not None and hasattr(be, "cuda_graphs"):
            be.cuda_graphs = args.cuda_graphs == "on"
        if args.persistent is not None and hasattr(be, "persistent"):
            be.persistent = args.persistent
    torch = None if args.no_torch else _try_import_torch()
    limiter = _apply_threads(args.threads, torch)
    cells = [Cell(H, T, B, L) for B in args.batch for L in layers for H in hidden for T in seqs]
    cells.sort(key=lambda c: (c.flops(), c.layers, c.H))
    command = "xlstm bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    meta = {"command": command, "argv": sys.argv, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(torch, backends), "backends": [b.name for b in backends],
            "hidden": list(hidden), "seq_len": list(seqs), "batch": list(args.batch), "layers": list(layers),
            "dtype": args.dtype, "precision": args.precision, "layer_norm": args.layer_norm, "input_size": "= H",
            "cuda_graphs": {b.name: b.graphs_active() for b in backends if hasattr(b, "graphs_active")},
            "persistent": args.persistent,
            "timing": "medians of interleaved rounds after warm-up, "
            "GPU synchronised after every call (perf_counter)"}
    print(f"xlstm bench: {len(cells)} cells x {len(backends)} backend(s) {[b.name for b in backends]}, "
          f"{args.dtype}, precision {args.precision}, torch {'off' if torch is None else torch.__version__}; budget {args.budget:g} s, "
          f"cells over {args.max_cell_seconds:g} s skipped", file=sys.stderr)
    stem = args.name or ("bench-" + "-".join(b.name for b in backends) + ("-quick" if quick else ""))
    args.out = args.out or new_run_dir()
    planner = Planner(args)
    bar = _progress(len(cells) * len(backends), not args.no_progress)
    rows, numpy_host, failed = [], {}, []
    try:
        _warm_up_process(backends, args, torch)
        # cell by cell (cheapest first), so a tight budget cuts every backend at the same size;
        # numpy first in each cell: its results are what the cupy backend is checked against
        order = sorted(backends, key=lambda b: b.name != "numpy")
        for cell in cells:
            numpy_host.clear()
            for be in order:
                label = f"{be.name} L={cell.layers} H={cell.H} T={cell.T} B={cell.B}"
                if bar is not None:
                    bar.set_postfix_str(label)
                elif not args.no_progress:
                    print(f"[{len(rows) + 1}/{len(cells) * len(backends)}] {label}", file=sys.stderr, flush=True)
                try:
                    row, host = bench_cell(cell, be, args, torch, planner,
                                           numpy_host if be.name == "cupy" else None)
                except BenchCheckError as e:
                    # results disagree: nothing of this cell is timed, the row says why, the run
                    # goes on (one suspect cell must not cost the others) and exits 1 at the end
                    row, host = _empty_row(cell, be, args), None
                    row.update(status="failed", note=f"check failed: {e}")
                    failed.append(str(e))
                    print(f"xlstm bench: {label}: check failed, not timed: {e}", file=sys.stderr)
                except XlstmError as e:
                    # this cell cannot run as asked (e.g. --persistent on where U does not fit):
                    # the row says why and the grid goes on
                    row, host = _empty_row(cell, be, args), None
                    row.update(status="error", note=f"{type(e).__name__}: {e}")
                    print(f"xlstm bench: {label}: {row['note']}", file=sys.stderr)
                if be.name == "numpy" and host is not None:
                    numpy_host[(cell.H, cell.T, cell.B, cell.layers)] = host
                rows.append(row)
                # what is done so far, on disk after every cell: a run killed by a time limit
                # keeps its finished cells (meta "partial": true until the run ends)
                write_outputs({"meta": dict(meta, partial=True, check_failed=failed), "rows": rows},
                              args.out, stem, plot=False)
                if bar is not None:
                    bar.update(1)
                gc.collect()
    finally:
        if limiter is not None:
            limiter.restore()
    if bar is not None:
        bar.close()
    # CuPy over NumPy, same cell
    by = {(r["backend"], r["H"], r["T"], r["B"], r["layers"]): r for r in rows}
    for r in rows:
        if r["backend"] == "cupy" and r["status"] == "ok":
            n = by.get(("numpy", r["H"], r["T"], r["B"], r["layers"]))
            if n and n["status"] == "ok":
                r["speedup_vs_numpy"] = n["step_ms"] / r["step_ms"]
    meta["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["elapsed_s"] = time.perf_counter() - planner.start
    meta["skipped"] = [f"{r['backend']} L={r['layers']} H={r['H']} T={r['T']} B={r['B']}: {r['note']}"
                       for r in rows if r["status"] != "ok"]
    meta["check_failed"] = failed
    result = {"meta": meta, "rows": rows}
    print(format_table(rows))
    if meta["skipped"]:
        print("\nskipped:\n  " + "\n  ".join(meta["skipped"]))
    paths = write_outputs(result, args.out, stem, plot=not args.no_plot)
    print(f"\nelapsed {meta['elapsed_s']:.0f} s; wrote " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    if failed:
        print(f"xlstm bench: {len(failed)} cell(s) failed their check (results disagree), not timed",
              file=sys.stderr)
        return 1
    return 0


def _run_load(args) -> int:
    rows, metas = [], []
    for p in args.load:
        with open(p) as f:
            res = json.load(f)
        rows += res["rows"]
        metas.append(res.get("meta", {}))
    by = {(r["backend"], r["H"], r["T"], r["B"], r["layers"]): r for r in rows}
    for r in rows:
        if r["backend"] == "cupy" and r["status"] == "ok" and not r.get("speedup_vs_numpy"):
            n = by.get(("numpy", r["H"], r["T"], r["B"], r["layers"]))
            if n and n["status"] == "ok":
                r["speedup_vs_numpy"] = n["step_ms"] / r["step_ms"]
    print(markdown_table(rows) if args.markdown else format_table(rows))
    machine = {}
    for m in metas:
        machine.update(m.get("machine", {}))
    result = {"meta": {"merged_from": list(args.load), "machine": machine, "runs": metas}, "rows": rows}
    if args.name:                       # --name STEM: write the merged JSON/CSV (and PNG)
        paths = write_outputs(result, args.out or new_run_dir(), args.name, plot=not args.no_plot)
        print("\nwrote " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xlstm bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except XlstmError as e:
        print(f"xlstm bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
