"""The ``xlstm`` command: ``xlstm info``, ``xlstm --version`` and the subcommands below.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them up, importing a module when its command runs.
Bad input exits with code 2 and a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "info": ("xlstm.app.cli", "show the version, the backends usable here and why any is not"),
    "gradcheck": ("xlstm.app.cli", "finite-difference check of every gradient of a small float64 LSTM"),
    "train": ("xlstm.app.train", "train a character/word language model (default corpus: Python's own source)"),
    "sample": ("xlstm.app.sample", "generate text from a checkpoint of `xlstm train`"),
    "export": ("xlstm.app.sample", "write a checkpoint's LSTM weights for another framework (--to torch)"),
    "trace": ("xlstm.trace_example", "print every named forward value and BPTT gradient of a tiny example, per step"),
    "bench": ("xlstm.bench", "time NumPy/CuPy against the GEMM floor and torch.nn.LSTM (table, JSON, CSV, PNG)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.prog.endswith("gradcheck"):
        parser.add_argument("--layers", type=int, default=2)
        parser.add_argument("--bidirectional", action="store_true")
        parser.add_argument("--hidden", type=int, default=4)
        parser.add_argument("--input", type=int, default=3)
        parser.add_argument("--seq-len", type=int, default=5)
        parser.add_argument("--batch", type=int, default=3)
        parser.add_argument("--layer-norm", action="store_true")


def run(args) -> int:
    if args.command == "info":
        return _info()
    return _gradcheck(args)


def _info() -> int:
    import numpy as np

    import xlstm
    from xlstm.backends import cupy_unavailable_reason

    print(f"xlstm {xlstm.__version__}  (numpy {np.__version__}, python {sys.version.split()[0]})")
    print("backends:")
    print("  numpy  available")
    reason = cupy_unavailable_reason()
    print("  cupy   available" if reason is None else f"  cupy   unavailable: {reason}")
    return 0


def _gradcheck(args) -> int:
    import numpy as np

    from xlstm import LSTM
    from xlstm.gradcheck import gradcheck_lstm

    lstm = LSTM(args.input, args.hidden, num_layers=args.layers, bidirectional=args.bidirectional,
                layer_norm=args.layer_norm, dtype="float64", seed=0, backend="numpy")
    x = np.random.default_rng(0).standard_normal((args.seq_len, args.batch, args.input))
    report = gradcheck_lstm(lstm, x)
    print(f"{lstm}\n{report}")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    import xlstm

    parser = argparse.ArgumentParser(prog="xlstm", description="xlstm: an LSTM with explicit BPTT on NumPy or CuPy")
    parser.add_argument("--version", action="version", version=f"xlstm {xlstm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}
    for name, (module, help_) in SUBCOMMANDS.items():
        p = parser.commands[name] = sub.add_parser(name, help=help_, description=help_)
        importlib.import_module(module).add_arguments(p)
    return parser


def _unknown(sub: argparse.ArgumentParser, extra: list[str]):
    """Exit 2 with the subcommand's usage, naming the unknown options and the closest known ones."""
    import difflib

    known = [o for a in sub._actions for o in a.option_strings]
    hints = []
    for e in extra:
        close = difflib.get_close_matches(e.split("=", 1)[0], known, n=1)
        if close:
            hints.append(f"{e.split('=', 1)[0]} (did you mean {close[0]}?)")
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; {', '.join(hints)}" if hints else ""))


def _stdout_closed() -> int:
    """The reader of our output went away (``xlstm trace | head``): stop quietly, as a shell tool does."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())       # Python's flush at exit must not fail again
    return 141      # 128 + SIGPIPE


def main(argv=None) -> int:
    from xlstm.errors import XlstmError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 2
    if extra:
        _unknown(parser.commands[args.command], extra)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # `train --nproc` passes it on to torchrun
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except XlstmError as e:
        print(f"xlstm {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)       # 2: bad input; a failure of another process: 1
    except KeyboardInterrupt:
        print(f"xlstm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


if __name__ == "__main__":
    sys.exit(main())
