"""``xlstm bench --torch-module``: a training step of ``xlstm.torch.LSTM`` beside ``torch.nn.LSTM``.

Per cell (H, T, B, layers; input size = H) both modules get the same weights (nn.LSTM's state
dict loaded into xlstm.torch.LSTM) on the same device (CUDA when torch has one and xlstm's CuPy
backend runs, else the CPU) and time one step: forward, then backward of a fixed dy into the
input and every weight. ``xlstm.LSTM`` (the NumPy/CuPy layer itself, no torch around it) runs
the same step beside them, so the table shows what the torch wrapper costs. Before timing,
outputs, states, input and weight gradients are checked against nn.LSTM's.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

from ..gradcheck import scaled_error

TOLERANCE = {"float32": 1e-4, "float64": 1e-10}   # of each tensor's largest entry, T=64 steps


class _Timed:
    def __init__(self, name, fn):
        self.name, self.fn, self.times = name, fn, []

    def median_ms(self):
        return statistics.median(self.times) * 1e3


def _device(torch):
    from ..backends import cupy_unavailable_reason

    if torch.cuda.is_available() and cupy_unavailable_reason() is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _cell(torch, H, T, B, L, dtype, device, seed):
    """Steps (callables) of the three contenders and the check's errors, for one cell."""
    import xlstm
    import xlstm.torch as xt

    tdt = getattr(torch, dtype)
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(H, H, num_layers=L).to(device=device, dtype=tdt)
    ours = xt.LSTM(H, H, num_layers=L, device=device, dtype=tdt)
    ours.load_state_dict(ref.state_dict())
    core = xlstm.interop.from_torch(ref, backend="cupy" if device.type == "cuda" else "numpy")
    x = torch.randn(T, B, H, dtype=tdt, device=device, requires_grad=True)
    dy = torch.randn(T, B, H, dtype=tdt, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x_core, dy_core = core.backend.asarray(x.detach().cpu().numpy()), core.backend.asarray(dy.cpu().numpy())

    def step(module):
        def run():
            x.grad = None
            for p in module.parameters():
                p.grad = None
            y, _ = module(x)
            y.backward(dy)
            sync()
            return y
        return run

    def core_step():
        core.zero_grad()
        core.forward(x_core)
        core.backward(dy_core)
        core.backend.synchronize()

    errs = {}
    y_ref = step(ref)()
    want = {"output": y_ref, "dx": x.grad, **{n: p.grad for n, p in ref.named_parameters()}}
    want = {k: v.detach().cpu().numpy() for k, v in want.items()}
    y = step(ours)()
    got = {"output": y, "dx": x.grad, **{n: p.grad for n, p in ours.named_parameters()}}
    for k, v in got.items():
        errs[k] = scaled_error(v.detach().cpu().numpy(), want[k])
    return [_Timed("xlstm.torch", step(ours)), _Timed("nn.LSTM", step(ref)), _Timed("xlstm.LSTM", core_step)], errs


def run(args, time_interleaved) -> int:
    """The --torch-module bench (``args``: the bench CLI's; ``time_interleaved``: its timer).

    The JSON is rewritten after every cell (``partial`` until the grid ends) and no cell starts
    once ``--budget`` seconds have passed, so a caller's time limit keeps what was measured."""
    try:
        import torch
    except ImportError:
        print("xlstm bench --torch-module: torch is not installed (pip install 'xlstm-bptt[torch]')", file=sys.stderr)
        return 2
    device = _device(torch)
    if device.type == "cuda":
        # float32 against float32: cuDNN's RNN and cuBLAS would otherwise use TF32 tensor cores,
        # whose 10-bit operands differ from xlstm's float32 products far beyond TOLERANCE
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = args.hidden or (64, 256)
    seqs = args.seq_len or (64,)
    layers = args.layers or (1,)
    repeats = args.repeat or (5 if args.quick else 15)
    command = "xlstm bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    print(f"xlstm bench --torch-module: training step (forward + backward) on {device}, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, (args.name or f"bench-torch-module-{device.type}") + ".json")
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()

    def write(rows, partial):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"command": command, "started_utc": started, "torch": torch.__version__,
                       "meta": {"partial": partial}, "rows": rows}, f, indent=1)
        os.replace(tmp, path)

    rows, ok = [], True
    cells = [(L, B, T, H) for L in layers for B in args.batch for T in seqs for H in hidden]
    for L, B, T, H in cells:
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            print(f"xlstm bench --torch-module: --budget {args.budget:g} s spent; "
                  f"{len(cells) - len(rows)} cell(s) not run", file=sys.stderr)
            break
        contenders, errs = _cell(torch, H, T, B, L, args.dtype, device, args.seed)
        worst = max(errs.values())
        # the bench's row keys (status, backend, step_ms, torch_step_ms, ...) so the bench
        # report reads these rows as it reads the grid's
        row = {"H": H, "T": T, "B": B, "layers": L, "device": str(device), "dtype": args.dtype,
               "backend": "cupy" if device.type == "cuda" else "numpy", "status": "ok", "note": "",
               "max_error": worst, "check_max_rel_err": worst}
        if worst > TOLERANCE[args.dtype]:
            bad = {k: v for k, v in errs.items() if v > TOLERANCE[args.dtype]}
            print(f"xlstm bench --torch-module: H={H} T={T} B={B} L={L}: xlstm.torch.LSTM differs from "
                  f"nn.LSTM beyond {TOLERANCE[args.dtype]:g}: {bad}; not timed", file=sys.stderr)
            ok = False
            row.update(status="failed", note=f"differs from nn.LSTM beyond {TOLERANCE[args.dtype]:g}: {bad}")
        else:
            time_interleaved(contenders, repeats, warmup=1, rounds=args.rounds, settle_s=args.settle)
            for c in contenders:
                row[c.name + "_ms"] = c.median_ms()
            row["xlstm.torch/nn.LSTM"] = row["xlstm.torch_ms"] / row["nn.LSTM_ms"]
            row["xlstm.torch/xlstm.LSTM"] = row["xlstm.torch_ms"] / row["xlstm.LSTM_ms"]
            row.update(step_ms=row["xlstm.torch_ms"], torch_step_ms=row["nn.LSTM_ms"],
                       step_over_torch=row["xlstm.torch/nn.LSTM"])
        rows.append(row)
        write(rows, partial=True)
    write(rows, partial=len(rows) < len(cells))
    print(format_rows(rows))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if ok else 1


def format_rows(rows) -> str:
    head = (f"{'H':>5} {'T':>4} {'B':>4} {'L':>2}  {'xlstm.torch ms':>14} {'nn.LSTM ms':>10} {'xlstm.LSTM ms':>13}"
            f"  {'vs nn.LSTM':>10} {'vs xlstm.LSTM':>13}  {'max err':>8}")
    lines = [head]
    for r in rows:
        if "nn.LSTM_ms" not in r:
            lines.append(f"{r['H']:>5} {r['T']:>4} {r['B']:>4} {r['layers']:>2}  mismatch (max error {r['max_error']:.2e})")
            continue
        lines.append(f"{r['H']:>5} {r['T']:>4} {r['B']:>4} {r['layers']:>2}  {r['xlstm.torch_ms']:>14.2f} "
                     f"{r['nn.LSTM_ms']:>10.2f} {r['xlstm.LSTM_ms']:>13.2f}  {r['xlstm.torch/nn.LSTM']:>9.2f}x "
                     f"{r['xlstm.torch/xlstm.LSTM']:>12.2f}x  {r['max_error']:>8.1e}")
    return "\n".join(lines)


__all__ = ["run", "format_rows", "TOLERANCE"]
