"""Data-parallel training over ``torch.distributed`` (gloo for NumPy, NCCL for CuPy).

    torchrun --nproc-per-node N -m xlstm train ...      or      xlstm train --nproc N ...

Every process (rank r of W) runs the same program on the same global data position: it reads
the global window x [T,B], keeps its streams ``x[:, r*B/W:(r+1)*B/W]``, draws the global
dropout/zoneout masks and keeps the same slice, so the W shares are exactly the 1-process
batch. After backward the gradients are summed over the ranks, in place, in one flat buffer
per dtype (every module's ``grads`` entries are views of it, so nothing is copied), and
divided by W; clipping and the optimiser step then see the same gradient on every rank, and
the parameters stay bitwise identical (checked at every checkpoint).

Why averaging is the 1-process gradient: the loss of a rank is the mean over its
T*(B/W) tokens; every rank has the same number of tokens (no masks or lengths in training,
every window is full), so mean over ranks of per-rank means = mean over all T*B tokens, exactly
in real arithmetic. In floating point the sums are grouped differently (two half-batch sums,
then one addition), so one step's results differ from one process in the last bits: about
1e-7 relative in float32, 1e-16 in float64 (Adam then magnifies such differences over steps:
the tests hold 25 steps to 1e-6 / 1e-12; see the README). Dividing by W is exact when W is a power of two.

torch is imported only here and only when a run is distributed; a single-process run never
imports it. NumPy arrays reach gloo through ``torch.from_numpy`` and CuPy arrays reach NCCL
through DLPack (``torch.from_dlpack``): both share memory, the all-reduce writes in place.
The NCCL path is untested without a GPU.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
import sys
from typing import Protocol

import numpy as np

from ..errors import InputError, XlstmError
from ..flat import FlatGrads

DEFAULT_TIMEOUT_S = 300.0


class DistributedError(XlstmError, RuntimeError):
    """Another rank failed or hung: the run stops (the last checkpoint stays valid)."""

    exit_code = 1


def add_arguments(g) -> None:
    g.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel on N processes on this machine (starts torchrun; needs torch: "
                        "pip install 'xlstm-bptt[distributed]'); --batch must be a multiple of N")
    g.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help="distributed runs: stop when another process has not answered for S seconds "
                        f"(default {DEFAULT_TIMEOUT_S:g})")


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _need_torch(what: str):
    try:
        import torch
        import torch.distributed as dist
    except ImportError as e:
        raise InputError(f"{what} needs PyTorch ({e}); install it with pip install 'xlstm-bptt[distributed]' "
                         "(or train on one process without --nproc/torchrun)") from None
    if not dist.is_available():
        raise InputError(f"{what} needs torch.distributed, which this PyTorch build lacks; "
                         "install the PyTorch wheel from pytorch.org")
    return torch, dist


# -- the launcher shortcut -----------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without ``--nproc N`` / ``--nproc=N`` (the workers must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def check_timeout(timeout_s) -> None:
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise InputError(f"--dist-timeout must be a positive number of seconds, got {timeout_s!r}")


def check_launch(nproc, timeout_s=DEFAULT_TIMEOUT_S) -> None:
    """Refuse a bad --nproc or --dist-timeout, or a missing torch, before anything starts."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise InputError(f"--nproc must be a positive integer, got {nproc!r}")
    check_timeout(timeout_s)
    _need_torch("--nproc")


def _quiet_torchrun() -> None:
    """torchrun's own log lines (its OMP_NUM_THREADS banner, a failed worker's exit code, the
    signals it forwards) would repeat what the workers and ``launch`` say in one line each."""
    import logging

    os.environ.setdefault("OMP_NUM_THREADS", "1")       # torchrun's default for its workers, without the banner
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)


def launch(nproc: int, argv: list[str]) -> int:
    """``xlstm train --nproc N``: run torchrun (torch.distributed.run) with N local workers, on 127.0.0.1.

    Ctrl-C or SIGTERM reaching this process is passed on to the workers by torchrun; each
    finishes its step, process 0 saves, and this returns 130 or 143.
    """
    check_launch(nproc)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    _quiet_torchrun()
    cmd = ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "xlstm", *strip_nproc(argv)]
    try:
        run(parse_args(cmd))
    except SignalException as e:    # Ctrl-C reached torchrun too: it has passed it on to the workers and waited
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        ec = failure.exitcode
        code = ec if isinstance(ec, int) and ec > 0 else 1
        if code not in (130, 143):      # interrupted (Ctrl-C, SIGTERM) and saved: the worker said so
            how = (f"was killed by signal {signal.Signals(-ec).name}" if isinstance(ec, int) and ec < 0
                   and -ec in signal.valid_signals() else f"ended with exit code {ec} (its message is above)")
            print(f"xlstm train: error: process {rank} of {nproc} {how}; torchrun stopped the others",
                  file=sys.stderr)
        return code
    return 0


# -- process groups ------------------------------------------------------------------------------
def setup(backend_name, timeout_s: float):
    """(backend, process group) of this run: ``Single()`` unless torchrun started this process."""
    from .. import backends

    check_timeout(timeout_s)
    if not launched():
        return backends.resolve(backend_name), Single()
    if (backend_name or backends.default_name()) != "numpy":
        backends.use_cuda_device(int(os.environ.get("LOCAL_RANK", "0")))    # before the backend probes a GPU
    backend = backends.resolve(backend_name, announce=os.environ.get("RANK") == "0")
    return backend, TorchGroup(backend, timeout_s)


def shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` rows, as equal as possible (the first ones one longer)."""
    q, r = divmod(n, world)
    lo = rank * q + min(rank, r)
    return slice(lo, lo + q + (rank < r))


def params_digest(model) -> str:
    """SHA-256 of every parameter's bytes, in the model's order."""
    h = hashlib.sha256()
    be = model.backend
    for k, v in model.params.items():
        h.update(k.encode())
        h.update(np.ascontiguousarray(be.to_numpy(v)).tobytes())
    return h.hexdigest()


def check_same(digests: list[str], step: int) -> None:
    """Raise when the ranks' parameter digests differ (a bug: data parallelism keeps them equal)."""
    if len(set(digests)) > 1:
        which = ", ".join(f"rank {i}: {d[:12]}" for i, d in enumerate(digests))
        raise DistributedError(f"the parameters differ between the processes at step {step} ({which}); "
                               "data-parallel training must keep them bitwise identical; please report this")


class ProcessGroup(Protocol):
    """What a training run needs from its processes: ``Single`` (one process, no torch) and
    ``TorchGroup`` (one of W processes of torch.distributed) provide it."""

    rank: int           # this process, 0 <= rank < world
    world: int          # number of processes
    main: bool          # rank 0: prints, writes metrics and checkpoints
    name: str | None    # the communication backend ("gloo", "nccl") or None

    def attach(self, grads: FlatGrads) -> None:
        """The model's gradients as flat buffers (``xlstm.flat.FlatGrads``), for ``allreduce_grads``
        (once, after the model is built)."""

    def allreduce_grads(self) -> None:
        """Every gradient := its mean over the processes, in place."""

    def sum(self, values) -> list[float]:
        """Elementwise sum of a list of floats over the processes."""

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True in any process."""

    def broadcast(self, obj):
        """Process 0's ``obj`` (small, picklable) in every process."""

    def gather_streams(self, a, backend) -> np.ndarray:
        """This process's streams of ``a`` (axis 1) joined with every other's, as NumPy."""

    def draw_masks(self, lstm, T: int, B: int):
        """The dropout/zoneout masks of this process's streams of the global batch B (None: the LSTM draws them)."""

    def check_same_params(self, model, step: int) -> None:
        """Raise DistributedError when the processes' parameters differ."""

    def close(self) -> None:
        """Leave the group (the run is over)."""


class Single:
    """One process: every collective is the identity. No torch."""

    rank, world, main, name = 0, 1, True, None

    def attach(self, grads: FlatGrads) -> None:
        pass

    def allreduce_grads(self) -> None:
        pass

    def sum(self, values):
        return [float(v) for v in values]

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def broadcast(self, obj):
        return obj

    def gather_streams(self, a, backend) -> np.ndarray:
        return backend.to_numpy(a)      # already every stream; the checkpoint copies its snapshot

    def draw_masks(self, lstm, T, B):
        return None         # the LSTM draws its own, for the whole batch

    def check_same_params(self, model, step) -> None:
        pass

    def close(self) -> None:
        pass


class TorchGroup:
    """This process's place in a torch.distributed job: gloo for NumPy arrays, NCCL for CuPy ones."""

    def __init__(self, backend, timeout_s: float):
        torch, dist = _need_torch("a distributed run (torchrun)")
        self.torch, self.dist, self.timeout_s = torch, dist, float(timeout_s)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cuda = backend.name == "cupy"
        self.name = "nccl" if self.cuda else "gloo"
        kw = {}
        if self.cuda:      # one GPU per process: the local rank's (CuPy's was chosen in setup)
            torch.cuda.set_device(self.local_rank)
            kw["device_id"] = torch.device("cuda", self.local_rank)
        self.device = torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")
        self.backend = backend
        try:
            self._call("joining the other processes (init_process_group)", dist.init_process_group,
                       backend=self.name, timeout=datetime.timedelta(seconds=self.timeout_s), **kw)
        except ValueError as e:     # env:// without MASTER_ADDR/MASTER_PORT
            raise InputError(f"cannot join the distributed run: {e}; start it with torchrun or "
                             "xlstm train --nproc N") from None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0
        self._flat, self._tensors = None, []
        # torchrun stops the other workers with SIGTERM when one fails or it is stopped itself: say so
        # instead of vanishing (inside the training loop the trainer finishes the step and saves)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        raise DistributedError(f"process {self.rank} of {self.world} was stopped (SIGTERM): the launcher "
                               "(torchrun) stops every process when one of them fails or is interrupted")

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except RuntimeError as e:       # DistBackendError, gloo's "Connection reset/closed", timeouts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(
                f"process {getattr(self, 'rank', os.environ.get('RANK'))} of "
                f"{getattr(self, 'world', os.environ.get('WORLD_SIZE'))}: {what} failed ({first}); another "
                f"process of this run stopped (it crashed, was killed, or did not answer within "
                f"--dist-timeout {self.timeout_s:g} s)") from None

    def _tensor(self, a):
        """A torch tensor sharing ``a``'s memory: from_numpy (host) or DLPack (CuPy, no copy)."""
        if isinstance(a, np.ndarray):
            return self.torch.from_numpy(a)
        return self.torch.from_dlpack(a)

    def attach(self, grads: FlatGrads) -> None:
        """Wrap the gradients' flat buffers as tensors once."""
        self._flat = grads
        self._tensors = [self._tensor(f) for f in self._flat.buffers]

    def allreduce_grads(self) -> None:
        """grads = (sum over ranks of grads) / W, in place, one all-reduce per flat buffer."""
        self._flat.check()
        if self.cuda:
            self.backend.synchronize()      # CuPy's stream may differ from torch's: gradients must be complete
        for t in self._tensors:
            self._call("the gradient all-reduce", self.dist.all_reduce, t)
        if self.cuda:
            self.torch.cuda.current_stream().synchronize()
        for f in self._flat.buffers:
            f /= self.world

    def sum(self, values):
        """Sum of float64 values over the ranks."""
        t = self.torch.tensor([float(v) for v in values], dtype=self.torch.float64, device=self.device)
        self._call("the loss all-reduce", self.dist.all_reduce, t)
        return [float(v) for v in t.cpu().tolist()]

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a small picklable value)."""
        box = [obj]
        self._call("a broadcast from process 0", self.dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather_streams(self, a, backend) -> np.ndarray:
        """[..., B/W, ...] per rank (axis 1: streams) -> the global [..., B, ...] as NumPy, on every rank."""
        mine = self._tensor(backend.xp.ascontiguousarray(a))
        parts = [self.torch.empty_like(mine) for _ in range(self.world)]
        self._call("gathering the carried LSTM state", self.dist.all_gather, parts, mine)
        return np.concatenate([p.cpu().numpy() for p in parts], axis=1)

    def draw_masks(self, lstm, T, B):
        """The global batch's dropout/zoneout masks, this rank's streams kept (None when none are drawn)."""
        if not (lstm.training and (lstm.zoneout > 0 or lstm.recurrent_dropout > 0)):
            return None
        sl = shard(B, self.rank, self.world)
        xp = lstm.xp
        return {kd: tuple(None if m is None else xp.ascontiguousarray(m[:, sl]) for m in ms)
                for kd, ms in lstm.draw_masks(T, B).items()}

    def check_same_params(self, model, step) -> None:
        digests = [None] * self.world
        self._call("comparing the parameters", self.dist.all_gather_object, digests, params_digest(model))
        check_same(digests, step)

    def close(self) -> None:
        # the run is over (done or failing): a SIGTERM from torchrun now would raise inside the
        # interpreter's exit handlers and print a traceback over the real message; let it pass
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # after a failed collective this returns at once and lets the process exit cleanly
        # (without it, gloo's threads abort the interpreter at exit)
        if self.dist.is_initialized():
            self.dist.destroy_process_group()
