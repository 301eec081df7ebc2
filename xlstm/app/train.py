"""``xlstm train``: a character- or word-level language model, trained by truncated BPTT.

    Embedding -> LSTM (layers, LayerNorm, recurrent dropout, zoneout) -> Dense -> softmax cross-entropy

The corpus is cut into ``--batch`` streams read in windows of ``--seq-len`` tokens, the LSTM
state carried from window to window; Adam with global-norm clipping and a warm-up + cosine
learning rate. Without ``--text`` it trains on the Python standard library's source (no
download). Checkpoints (``checkpoint.py``) hold everything a run depends on, so ``--resume``
continues exactly: the resumed losses equal an uninterrupted run's (tested on the CPU; on the
GPU every gradient is summed in a fixed order, no atomics, and the gpu tests in
tests/test_train.py check the same there). A larger ``--steps`` on ``--resume`` adds a new
learning-rate schedule phase (``schedule_phases``). Ctrl-C and SIGTERM finish the step and save.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from .. import backends, flat
from ..backends import blas
from . import checkpoint, data, distributed
from .model import DEFAULT_STEPS, DEFAULTS, build_model, check_config, given_options, lstm_of, merge_resumed
from ..errors import InputError, XlstmError

__all__ = ["DEFAULTS", "build_model", "train_step", "eval_sums", "Trainer", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    g = p.add_argument_group("data")
    g.add_argument("--text", metavar="FILE", help="training text (default: the Python standard library's source, no download)")
    g.add_argument("--encoding", metavar="CODEC", help="encoding of --text (default utf-8)")
    g.add_argument("--level", choices=data.LEVELS, help="tokens: characters (default) or words")
    g.add_argument("--max-chars", type=int, metavar="N",
                   help=f"use only the first N characters (default corpus: {data.DEFAULT_MAX_CHARS:,})")
    g.add_argument("--vocab-size", type=int, metavar="N", help="word level: keep the N-1 most frequent words, plus <unk> (default 5000)")
    g.add_argument("--val-fraction", type=float, metavar="F", help="end of the corpus held out for validation (default 0.1)")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, metavar="H", help=f"LSTM hidden size (default {DEFAULTS['hidden']})")
    g.add_argument("--layers", type=int, metavar="N", help="LSTM layers (default 1)")
    g.add_argument("--embed", type=int, metavar="E", help=f"embedding size (default {DEFAULTS['embed']})")
    g.add_argument("--layer-norm", action="store_true", default=None, help="LayerNorm LSTM cell")
    g.add_argument("--dropout", type=float, metavar="P", help="recurrent dropout on the candidate g (default 0)")
    g.add_argument("--zoneout", type=float, metavar="P", help="zoneout probability of h and c (default 0)")
    g.add_argument("--dtype", choices=("float32", "float64"), help="parameter dtype (default float32)")
    g.add_argument("--precision", choices=("float32", "tf32", "bf16"),
                   help="GEMM operands in float32 (default, exact), TF32 or bfloat16, summed in float32; state, "
                        "gradients and Adam's weights stay float32. float32 models only; on the numpy backend an "
                        "emulation, slower than float32")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, metavar="N", help=f"optimiser steps (default {DEFAULT_STEPS})")
    g.add_argument("--epochs", type=float, metavar="N", help="train for N passes over the corpus instead of --steps")
    g.add_argument("--seq-len", type=int, metavar="T", help=f"BPTT window in tokens (default {DEFAULTS['seq_len']})")
    g.add_argument("--batch", type=int, metavar="B", help=f"parallel streams (default {DEFAULTS['batch']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate of Adam (default {DEFAULTS['lr']})")
    g.add_argument("--warmup", type=int, metavar="N",
                   help="linear warm-up steps (default min(50, steps/10)); on --resume with a larger --steps: "
                        "the warm-up of the added steps' schedule phase (default 0)")
    g.add_argument("--schedule", choices=("cosine", "constant"), help="learning rate after warm-up (default cosine)")
    g.add_argument("--clip", type=float, metavar="NORM", help="global gradient-norm clip (default 1.0)")
    g.add_argument("--weight-decay", type=float, metavar="WD", help="AdamW weight decay (default 0)")
    g.add_argument("--seed", type=int, help="seed of initialisation, masks and batching (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--backend", choices=backends.NAMES, help="numpy, cupy or auto (default: $XLSTM_BACKEND, else auto)")
    g.add_argument("--out", metavar="DIR", help="run folder for checkpoints and metrics (default runs/xlstm-NNN)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR (or from one ckpt-* folder) exactly")
    g.add_argument("--eval-every", type=int, metavar="N", help="validate every N steps (default 100)")
    g.add_argument("--eval-tokens", type=int, metavar="N", help="validate on at most N tokens (default 40000; 0 = all)")
    g.add_argument("--save-every", type=int, metavar="N", help="checkpoint every N steps (default 200)")
    g.add_argument("--keep", type=int, metavar="N", help="keep the newest N checkpoints (default 3)")
    g.add_argument("--log-every", type=int, metavar="N", help="append the training loss to metrics.jsonl every N steps (default 10)")
    g.add_argument("--plot", action="store_true", help="write loss.png (training and validation loss; needs matplotlib)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    g.add_argument("--threads", type=int, default=1, metavar="N",
                   help="BLAS threads of the numpy backend; 0 leaves the BLAS default (default 1: on an idle "
                        "2-core machine 0 is ~30%% faster, but when another process holds a core the "
                        "busy-waiting BLAS threads make it 4-7x slower)")
    distributed.add_arguments(p.add_argument_group("several processes (data-parallel; see the README)"))
    # tests: behave as if Ctrl-C came right after step N (save, exit 130)
    a("--stop-after", type=int, help=argparse.SUPPRESS)


def eval_sums(model, streams: np.ndarray, seq_len: int) -> tuple[float, int]:
    """(sum of cross-entropies, number of tokens) over streams [B, L]: the parts of a mean that
    several processes, each with some of the streams, add up exactly."""
    from ..losses import cross_entropy

    if streams.shape[0] == 0:
        return 0.0, 0
    was_training = model.training
    model.eval()
    state, total, count = None, 0.0, 0
    L = streams.shape[1]
    with model.backend.deferred() as reads:
        for p in range(0, L - 1, seq_len):
            x = np.ascontiguousarray(streams[:, p:min(p + seq_len, L - 1)].T)
            y = np.ascontiguousarray(streams[:, p + 1:p + 1 + x.shape[0]].T)
            logits = model.forward(x, state=state)
            state = model.last_state
            # summed on the device in float64, as the host would, and read once at the end
            loss, _ = cross_entropy(logits, y, on_device=True)
            total = total + loss * y.size
            count += y.size
        reads.put("total", total)
        total = reads.read()["total"]
    model.train(was_training)
    return (total if count else 0.0), count


# -- progress -----------------------------------------------------------------------------------
class _PlainBar:
    """Progress lines every few seconds where tqdm is not installed."""

    def __init__(self, total, initial, disable):
        self.total, self.n, self.disable = total, initial, disable
        self.t0, self.n0, self.last, self.postfix = time.time(), initial, 0.0, ""

    def update(self, k=1):
        self.n += k
        now = time.time()
        if not self.disable and (now - self.last > 5 or self.n == self.total):
            self.last = now
            rate = (self.n - self.n0) / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else math.inf
            print(f"step {self.n}/{self.total}  {self.postfix}  ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def set_postfix_str(self, s, refresh=False):
        self.postfix = s

    @staticmethod
    def write(s):
        print(s, flush=True)

    def close(self):
        pass


def _bar(total, initial, enabled):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainBar(total, initial, not enabled)
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, disable=not enabled,
                smoothing=0.1, file=sys.stderr, mininterval=0.5)


class _Stop:
    """Ctrl-C (SIGINT) or SIGTERM (a batch scheduler, a preempted machine): finish the current
    step, save, stop with exit code 130 or 143. A second Ctrl-C stops at once (the last
    checkpoint stays); a repeated SIGTERM changes nothing (a launcher may forward the one the
    process already had)."""

    CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self, say):
        self.signal, self.say, self._old = None, say, {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
            self.say("Ctrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to quit without saving)"
                     if signum == signal.SIGINT else "SIGTERM: finishing this step, then saving a checkpoint")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.CODES:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


# -- metrics and plot -------------------------------------------------------------------------
class Metrics:
    """metrics.jsonl in the run folder: one JSON object per line (train or val record)."""

    def __init__(self, run_dir: str, resume_step: int | None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # drop what was logged after the checkpoint (those steps run again now), and a schedule
            # phase planned at it (planned again now)
            keep = [r for r in self.read(self.path) if r.get("step", 0) < resume_step
                    or (r.get("step", 0) == resume_step and r.get("split") != "schedule")]
            checkpoint.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        elif resume_step is None:
            open(self.path, "w").close()

    @staticmethod
    def read(path: str) -> list[dict]:
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass        # a line cut short by a crash
        return out

    def append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def _require_matplotlib():
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib, which is not installed; "
                         "pip install matplotlib (or 'xlstm-bptt[plot]'), or drop --plot")


def write_plot(run_dir: str, unigram: float | None) -> str:
    """loss.png: training and validation loss against step, with the unigram baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = Metrics.read(os.path.join(run_dir, "metrics.jsonl"))
    tr = [(r["step"], r["loss"]) for r in recs if r.get("split") == "train"]
    va = [(r["step"], r["loss"]) for r in recs if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="training loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", lw=1.5, ms=3)
    if unigram:
        ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram entropy {unigram:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, "loss.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    checkpoint.write_atomic(path, buf.getvalue())
    return path


# -- training ---------------------------------------------------------------------------------
def _corpus(cfg: dict) -> tuple[str, str]:
    if cfg["text"] is None:
        return data.default_corpus(cfg["max_chars"] or data.DEFAULT_MAX_CHARS)
    text = data.read_text(cfg["text"], cfg["encoding"], cfg["max_chars"])
    return text, f"{cfg['text']} ({len(text):,} characters)"


def _versus(loss: float, unigram: float) -> str:
    r = 100 * (1 - loss / unigram)
    return f"{r:.1f}% below it" if r >= 0 else f"{-r:.1f}% above it"


def _state_arrays(model, opt, carry) -> dict:
    arrays = {"param/" + k: v for k, v in model.state_dict().items()}
    for k, st in opt.state_dict()["state"].items():
        for b, v in st.items():
            arrays[f"opt/{k}/{b}"] = v
    if carry is not None:       # NumPy [layers, B, H]: every stream, gathered from all processes;
        # copied again, so the snapshot never shares memory with a live state
        arrays["carry/h"], arrays["carry/c"] = (np.array(a, copy=True) for a in carry)
    return arrays


class _Discard:
    """Metrics of a process other than rank 0: only rank 0 writes."""

    path = None

    def append(self, rec) -> None:
        pass


def _least_chars(cfg: dict) -> str:
    """' (at least N with these sizes)': the shortest char-level corpus whose training split holds one window."""
    if cfg["level"] != "char":
        return ""
    need = cfg["batch"] * (cfg["seq_len"] + 1) + cfg["seq_len"] - 1
    n = need
    while n - max(2, int(round(n * cfg["val_fraction"]))) < need:      # data.split's validation share
        n += 1
    return f" (at least {n:,} with these sizes)"


def _quiet_precision_warning():
    """The header says a precision mode is emulated; the library's one-time warning would only
    print a source line into the progress bar."""
    import warnings

    from ..precision import PrecisionEmulationWarning
    warnings.simplefilter("ignore", PrecisionEmulationWarning)


def plan(args, world: int = 1, main: bool = True):
    """(config, run folder, (folder, arrays, meta) of the checkpoint resumed or None), checked.

    Everything that can be refused before a process starts is refused here (the --nproc
    launcher calls it first, so a bad option is one message, not one per process). ``main``:
    this process reports skipped damaged checkpoints (the others keep quiet).
    """
    given = given_options(args)
    resumed = None
    if args.resume:
        folder, arrays, meta = checkpoint.load_latest(args.resume, warn=lambda s: main and print(s, file=sys.stderr))
        cfg = merge_resumed(meta.get("config") or {}, given, folder)
        run_dir = args.out or (os.path.dirname(os.path.abspath(folder)) if checkpoint.checkpoint_step(folder) is not None
                               else args.resume)
        resumed = (folder, arrays, meta)
    else:
        cfg = dict(DEFAULTS)
        cfg.update(given)
        run_dir = args.out or checkpoint.new_run_dir("xlstm")
        if checkpoint.list_checkpoints(run_dir):
            raise InputError(f"{run_dir} already holds checkpoints of a run; continue it with --resume {run_dir}, "
                             "or choose another --out")
    check_config(cfg)
    if cfg["batch"] % world:
        raise InputError(f"--batch {cfg['batch']} cannot be split evenly over {world} processes: each "
                         f"takes --batch / {world} streams; give a --batch that is a multiple of {world}")
    if args.threads < 0:
        raise InputError(f"--threads must be 0 (BLAS default) or positive, got {args.threads}")
    if args.plot:
        _require_matplotlib()
    if cfg["steps"] is None and cfg["epochs"] is None:
        cfg["steps"] = DEFAULT_STEPS
    return cfg, run_dir, resumed


def schedule_phases(cfg: dict, total: int, saved_meta: dict | None, added_warmup: int | None) -> list[dict]:
    """The learning-rate schedule as phases {start, end, warmup}: step s of a phase gets
    ``lr_schedule(s - start, lr, warmup, end - start, schedule)``.

    A new run is one phase over all its steps, its warm-up min(--warmup, steps/10). A resumed
    run keeps the phases it planned; steps beyond them (a larger --steps) are a new phase:
    the schedule again from the peak --lr, over the added steps, warm-up ``added_warmup``
    (default 0) capped the same way.
    """
    if saved_meta is None:
        phases = [{"start": 0, "end": total, "warmup": min(cfg["warmup"], total // 10)}]
    else:
        phases = [dict(p) for p in saved_meta.get("schedule_phases") or []]
        if not phases:      # a checkpoint from before phases: one over the total it planned
            end = int(saved_meta.get("total_steps") or total)
            phases = [{"start": 0, "end": end, "warmup": min(cfg["warmup"], end // 10)}]
    start = phases[-1]["end"]
    if total > start:
        n = total - start
        phases.append({"start": start, "end": total, "warmup": min(added_warmup or 0, n // 10)})
    elif added_warmup is not None:
        raise InputError(f"--warmup on --resume sets the warm-up of the steps added by a larger --steps; this run "
                         f"plans {start} steps and --steps gives {total}; drop --warmup or give --steps above {start}")
    return phases


def train_step(model, opt, x, y, carry, clip: float, group=None, batch=None):
    """One optimiser step of the language model: (loss, grad norm before clipping, carried state).

    x, y [T, B] token ids (this process's streams, on the host); carry: the LSTM state from the
    last window or None. zero_grad -> forward -> cross-entropy -> backward -> all-reduce -> clip
    -> Adam (opt.lr set by the caller). batch: the global batch (masks of a distributed run).
    Nothing here waits for the device: loss (this process's mean) and norm are 0-d float64
    arrays of the model's backend, read through ``backend.deferred()`` by the caller; input
    checks of device arrays wait in that queue too.
    """
    from ..losses import cross_entropy
    from ..optim import clip_grad_norm

    group = group or distributed.Single()
    lstm = lstm_of(model)
    opt.zero_grad()                 # the model's gradients: one fill where they are flat
    masks = group.draw_masks(lstm, x.shape[0], batch or x.shape[1])
    logits = model.forward(x, state=carry, **({} if masks is None else {"masks": masks}))
    carry = model.last_state
    loss, dlogits = cross_entropy(logits, y, on_device=True)
    model.backward(dlogits)
    group.allreduce_grads()     # before clipping: every process clips and steps the same gradient
    norm = clip_grad_norm(model, clip, on_device=True)
    opt.step()
    return loss, norm, carry


def _sample_hint(run_dir: str, vocab) -> str:
    """A sample command that works for this run: a prime only where the vocabulary has it."""
    import shlex

    cmd = f"xlstm sample {shlex.quote(str(run_dir))}"
    try:
        vocab.encode(data.tokenize("def ", vocab.level), strict=True)
        cmd += " --prime 'def '"
    except InputError:
        pass
    return cmd + " --length 300"


class Trainer:
    """One invocation of ``xlstm train``, top-down: ``setup`` (data, model, optimiser),
    ``resume`` (a checkpoint's state), then ``fit``: ``step`` after step, ``validate`` and
    ``save`` on their intervals, until the planned steps are done or a signal stops it.

    The loop does not wait for the device: each step's loss and gradient norm go into the
    backend's ``deferred()`` queue, which ``read_logged`` reads (with the queued input checks)
    at the next log, validation or checkpoint.
    """

    def __init__(self, args, backend, group, t_start: float):
        self.args, self.backend, self.group, self.t_start = args, backend, group, t_start
        self.cfg, run_dir, self.resumed = plan(args, group.world, group.main)
        self.run_dir = group.run_dir = group.broadcast(run_dir)     # rank 0 names the run folder
        self.step_no, self.carry, self.elapsed0, self.last_val = 0, None, 0.0, None
        self.setup()
        if self.resumed:
            self.resume()
        self.phases = schedule_phases(self.cfg, self.total, self.resumed[2] if self.resumed else None,
                                      getattr(args, "warmup", None) if self.resumed else None)
        # every parameter and gradient a view of one flat buffer: clipping scales it in one pass,
        # Adam updates all at once and a process group all-reduces the gradients' buffers
        flat.FlatParams(self.model)
        group.attach(flat.FlatGrads(self.model))
        if group.main:
            os.makedirs(self.run_dir, exist_ok=True)
            self.metrics = Metrics(self.run_dir, self.step_no if self.resumed else None)
        else:
            self.metrics = _Discard()

    def say(self, *a, **kw):
        if self.group.main:
            print(*a, **kw)

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Corpus, vocabulary, batches (this process's streams), model and optimiser."""
        from ..optim import Adam

        cfg = self.cfg
        if self.args.threads and self.backend.name == "numpy":
            blas.set_threads(self.args.threads)
        if cfg.get("precision", "float32") != "float32":
            _quiet_precision_warning()
        ids, chars = self.read_corpus()
        self.make_batches(ids, chars)
        self.model = build_model(cfg, len(self.vocab), self.backend)
        self.lstm = lstm_of(self.model)
        self.opt = Adam(self.model, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    def read_corpus(self):
        """(token ids, characters read): the text, checked against a resumed run's, and its vocabulary."""
        cfg = self.cfg
        text, self.desc = _corpus(cfg)
        self.corpus_sha = data.fingerprint(text)
        vocab = None
        if self.resumed:
            folder, _, meta = self.resumed
            if meta.get("corpus", {}).get("sha256") != self.corpus_sha:
                what = ("--text" if cfg["text"] else "default corpus (this Python's standard library source); "
                        "resume with the same Python installation")
                raise InputError(f"the training text differs from the one the checkpoint {folder} was trained on "
                                 f"({self.desc}); resume with the same {what}, or start a new run")
            vocab = data.Vocab.from_json(meta.get("vocab"))
        toks = data.tokenize(text, cfg["level"])
        self.vocab = vocab or data.Vocab.build(toks, cfg["level"], cfg["vocab_size"])
        ids = self.vocab.encode(toks)
        self.n_tokens = len(ids)
        self.unigram = data.unigram_entropy(ids, len(self.vocab))
        return ids, len(text)

    def make_batches(self, ids, chars: int) -> None:
        """Training windows (this process's streams of them), validation streams, the planned total."""
        cfg, group = self.cfg, self.group
        try:
            train_ids, val_ids = data.split(ids, cfg["val_fraction"], cfg["seq_len"], cfg["batch"])
        except InputError as e:
            if not cfg["max_chars"] or chars < cfg["max_chars"]:
                raise
            raise InputError(f"{e}; here --max-chars {cfg['max_chars']:,} cut the corpus that short: give a "
                             f"larger --max-chars{_least_chars(cfg)}") from None
        self.stream = data.BatchStream(train_ids, cfg["seq_len"], cfg["batch"], seed=cfg["seed"])
        val = data.eval_streams(val_ids, max(cfg["batch"], 64), cfg["eval_tokens"] or None)
        self.mine = distributed.shard(cfg["batch"], group.rank, group.world)     # this process's training streams
        self.val = val[distributed.shard(len(val), group.rank, group.world)]
        self.total = (cfg["steps"] if cfg["steps"] is not None
                      else max(1, math.ceil(cfg["epochs"] * self.stream.windows_per_epoch)))

    def resume(self) -> None:
        """Parameters, optimiser moments, RNG states, data position and carried state of the checkpoint."""
        folder, arrays, meta = self.resumed
        try:
            self.model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("param/")})
            ost = {}
            for k, v in arrays.items():
                if k.startswith("opt/"):
                    name, buf = k[4:].rsplit("/", 1)
                    ost.setdefault(name, {})[buf] = v
            self.opt.load_state_dict({"step": meta["optimizer"]["step"], "hyper": meta["optimizer"]["hyper"],
                                      "state": ost})
            self.lstm.mask_rng.bit_generator.state = meta["rng"]["mask"]
            self.stream.load_state_dict(meta["rng"]["stream"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, XlstmError):
                raise checkpoint.CheckpointError(f"checkpoint {folder} is incompatible with this run: {e}") from None
            raise checkpoint.CheckpointError(f"checkpoint {folder} is incomplete or damaged (missing {e}); "
                                             "use an earlier checkpoint") from None
        if "carry/h" in arrays:
            # stored for every stream: a run resumes on any number of processes
            self.carry = tuple(self.backend.asarray(np.ascontiguousarray(arrays[k][:, self.mine]))
                               for k in ("carry/h", "carry/c"))
        self.step_no, self.elapsed0 = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
        self.last_val = meta.get("val_loss")

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to the planned total; 0 when done, 130 (Ctrl-C) or 143 (SIGTERM) when stopped and saved."""
        cfg, group = self.cfg, self.group
        self.header()
        start = self.step_no
        if self.resumed and self.step_no >= self.total:
            self.say(f"  the run is at step {self.step_no}, which --steps {self.total} does not pass; give --steps "
                     f"above {self.step_no} to train longer")
            return 0
        self.bar = _bar(self.total, self.step_no, self.args.progress and group.main)
        self.t_loop = time.time()
        self.ema = self.rate = None
        # (step, lr, phase) of the steps whose loss and norm are not read yet
        self.logged, self.t_read = [], time.perf_counter()
        with _Stop(lambda s: group.main and self.bar.write(s)) as stop, self.backend.deferred() as self.reads:
            code = None
            while self.step_no < self.total:
                self.step()
                s = self.step_no
                if self.args.stop_after is not None and s >= self.args.stop_after and s < self.total:
                    stop.signal = stop.signal or signal.SIGINT
                # every process stops after the same step: (any Ctrl-C, any SIGTERM) over the processes
                sig = group.sum([float(stop.signal == signal.SIGINT), float(stop.signal == signal.SIGTERM)])
                stopping = sig[0] > 0 or sig[1] > 0
                if (s % cfg["log_every"] == 0 or s % cfg["eval_every"] == 0 or s == self.total or stopping
                        or s % cfg["save_every"] == 0):
                    self.read_logged()      # before anything is validated or saved
                if s % cfg["eval_every"] == 0 or s == self.total:
                    self.validate()
                if stopping:
                    code = 143 if sig[1] > 0 else 130
                    break
                if s % cfg["save_every"] == 0 and s < self.total:
                    self.save()
            self.read_logged()
            path = self.save()
        self.bar.close()
        return self.summary(start, path, code)

    def lr_at(self, step: int) -> tuple[float, int]:
        """(learning rate, schedule phase) of the step after ``step`` steps."""
        from ..optim import lr_schedule

        k = next((i for i, p in enumerate(self.phases) if step < p["end"]), len(self.phases) - 1)
        p = self.phases[k]
        return lr_schedule(step - p["start"], self.cfg["lr"], p["warmup"], p["end"] - p["start"],
                           self.cfg["schedule"]), k

    def step(self) -> None:
        """One window: the next batch (this process's streams), the learning rate, one optimiser step."""
        x, y, reset = self.stream.next()
        if reset:
            self.carry = None        # a new epoch starts from zeros, deterministically
        x, y = np.ascontiguousarray(x[:, self.mine]), np.ascontiguousarray(y[:, self.mine])
        self.opt.lr, phase = self.lr_at(self.step_no)
        if phase and self.phases[phase]["start"] == self.step_no:
            self.new_phase(phase)
        loss, norm, self.carry = train_step(self.model, self.opt, x, y, self.carry, self.cfg["clip"],
                                            self.group, self.cfg["batch"])
        self.step_no += 1
        self.reads.put(("loss", self.step_no), loss)
        self.reads.put(("norm", self.step_no), norm)
        self.logged.append((self.step_no, self.opt.lr, phase))
        self.bar.update(1)

    def new_phase(self, k: int) -> None:
        p = self.phases[k]
        self.metrics.append({"split": "schedule", "step": p["start"], "phase": k, "start": p["start"],
                             "end": p["end"], "warmup": p["warmup"], "lr": self.cfg["lr"],
                             "schedule": self.cfg["schedule"]})

    def read_logged(self) -> None:
        """Read the queued losses and norms (one transfer), log them, stop on a non-finite loss."""
        if not self.logged:
            return
        cfg, group = self.cfg, self.group
        vals = self.reads.read()        # a failed input check raises here, naming the input
        n = len(self.logged)
        losses = [v / group.world for v in group.sum([vals[("loss", s)] for s, _, _ in self.logged])]
        now = time.perf_counter()
        r = cfg["batch"] * cfg["seq_len"] * n / max(now - self.t_read, 1e-9)
        self.rate, self.t_read = (r if self.rate is None else 0.9 * self.rate + 0.1 * r), now
        for (s, lr, phase), loss in zip(self.logged, losses):
            if not math.isfinite(loss):
                self.bar.close()
                raise XlstmError(f"the training loss became {loss} at step {s}; lower --lr "
                                 f"(now {cfg['lr']}) or --clip; the checkpoints in {self.run_dir} are from before")
            self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
            if s % cfg["log_every"] == 0 or s == self.total:
                rec = {"split": "train", "step": s, "loss": loss, "lr": lr, "grad_norm": vals[("norm", s)],
                       "tokens_per_s": round(self.rate, 1), "elapsed_s": self.elapsed()}
                if phase:
                    rec["phase"] = phase
                self.metrics.append(rec)
        self.logged.clear()
        self.bar.set_postfix_str(f"loss {self.ema:.3f}, {self.rate:,.0f} tok/s", refresh=False)

    def elapsed(self) -> float:
        return round(self.elapsed0 + time.time() - self.t_loop, 3)

    def validate(self) -> None:
        """Mean cross-entropy over the validation streams (each process sums its share)."""
        total_nats, count = self.group.sum(eval_sums(self.model, self.val, self.cfg["seq_len"]))
        v = self.last_val = total_nats / count
        self.metrics.append({"split": "val", "step": self.step_no, "loss": v, "ppl": data.perplexity(v),
                             "elapsed_s": self.elapsed()})
        if self.group.main:
            self.bar.write(f"step {self.step_no:>6}: val loss {v:.4f} nats (ppl {data.perplexity(v):.2f}); "
                           f"unigram entropy {self.unigram:.4f}; {_versus(v, self.unigram)}")

    def save(self):
        """Checkpoint of this step (process 0 writes it; every process takes part in the gathers)."""
        group = self.group
        full = None if self.carry is None else tuple(group.gather_streams(a, self.backend) for a in self.carry)
        group.check_same_params(self.model, self.step_no)
        if not group.main:
            return None
        return checkpoint.save(self.run_dir, self.step_no, _state_arrays(self.model, self.opt, full), self.meta(),
                               keep=self.cfg["keep"])

    def meta(self) -> dict:
        return {"config": self.cfg, "vocab": self.vocab.to_json(),
                "corpus": {"description": self.desc, "sha256": self.corpus_sha, "tokens": int(self.n_tokens)},
                "optimizer": {k: v for k, v in self.opt.state_dict().items() if k != "state"} | {"type": "Adam"},
                "rng": {"mask": self.lstm.mask_rng.bit_generator.state, "stream": self.stream.state_dict()},
                "elapsed_s": self.elapsed0 + time.time() - self.t_loop, "val_loss": self.last_val,
                "unigram_entropy": self.unigram, "total_steps": self.total, "schedule_phases": self.phases,
                "backend": self.backend.name, "processes": self.group.world,
                "xlstm_version": __import__("xlstm").__version__}

    # -- what the user reads ------------------------------------------------------------------------
    def header(self) -> None:
        cfg, group, say = self.cfg, self.group, self.say
        V = len(self.vocab)
        say(f"xlstm train: {self.desc}; {cfg['level']} level, {self.n_tokens:,} tokens, vocabulary {V}")
        say(f"  model: Embedding({V}, {cfg['embed']}) -> {self.lstm} -> Dense({cfg['hidden']}, {V}); "
            f"{sum(int(p.size) for p in self.model.params.values()):,} parameters")
        say(f"  unigram entropy of the corpus: {self.unigram:.4f} nats/token (the loss to beat); "
            f"{self.total} steps of {cfg['batch']}x{cfg['seq_len']} tokens "
            f"({self.total / self.stream.windows_per_epoch:.2f} epochs); run folder {self.run_dir}")
        if cfg.get("precision", "float32") != "float32":
            say(f"  precision {cfg['precision']}: GEMM operands rounded to {cfg['precision']}, float32 accumulation, "
                "state and weights"
                + ("; EMULATED on the numpy backend (slower than float32, for checking, not speed)"
                   if self.backend.name == "numpy" else ""))
        if group.world > 1:
            say(f"  data-parallel on {group.world} processes ({group.name}): {cfg['batch'] // group.world} streams each")
        if self.resumed:
            say(f"  resuming from {self.resumed[0]} at step {self.step_no}")
            for k, p in enumerate(self.phases):
                if k and p["end"] > self.step_no:
                    warm = f"{p['warmup']} warm-up steps" if p["warmup"] else "no warm-up"
                    say(f"  steps {p['start'] + 1}-{p['end']} are schedule phase {k}: {cfg['schedule']} from the peak "
                        f"--lr {cfg['lr']:g} again over {p['end'] - p['start']} steps, {warm} (steps up to "
                        f"{p['start']} keep the schedule they were planned with)")

    def summary(self, start: int, path, code) -> int:
        secs = time.time() - self.t_start
        n, say = self.step_no - start, self.say
        if self.args.plot and self.group.main:
            say(f"  plot: {write_plot(self.run_dir, self.unigram)}")
        if code is not None:
            how = "interrupted" if code == 130 else "stopped by SIGTERM"
            say(f"{how} at step {self.step_no} of {self.total}; checkpoint saved to {path}\n"
                f"  continue with: xlstm train --resume {self.run_dir}")
            return code
        where = f"backend {self.backend.name}" + (f", {self.group.world} processes" if self.group.world > 1 else "")
        ran = f"{n} steps" + (f" ({start + 1}-{self.step_no})" if start else "")
        v = self.last_val
        say(f"done: {ran} in {secs:.1f} s ({where}); final val loss {v:.4f} nats "
            f"(ppl {data.perplexity(v):.2f}) vs unigram entropy {self.unigram:.4f} nats: {_versus(v, self.unigram)}")
        say(f"  checkpoint {path}; metrics {self.metrics.path}\n  sample with: {_sample_hint(self.run_dir, self.vocab)}")
        return 0


def run(args) -> int:
    if getattr(args, "nproc", None) is not None:
        if distributed.launched():
            raise InputError("--nproc starts the processes itself; under torchrun drop --nproc")
        distributed.check_launch(args.nproc, getattr(args, "dist_timeout", distributed.DEFAULT_TIMEOUT_S))
        plan(args, args.nproc, main=False)      # refuse bad options once, before any process starts
        return distributed.launch(args.nproc, getattr(args, "argv", None) or sys.argv[1:])
    t_start = time.time()
    # an unusable --backend cupy stops here, with the reason; under torchrun each process takes its own GPU
    backend, group = distributed.setup(args.backend, getattr(args, "dist_timeout", distributed.DEFAULT_TIMEOUT_S))
    group.run_dir = None
    try:
        return Trainer(args, backend, group, t_start).fit()
    except OSError as e:        # e.g. a full disk or a read-only --out while writing metrics
        where = e.filename or args.out or args.resume or "the run folder"
        raise XlstmError(f"cannot write {where}: {e.strerror or e}; free some disk space or choose another --out "
                         "(the checkpoints already written are intact)") from None
    except distributed.DistributedError as e:
        raise distributed.DistributedError(f"{e}. {_resume_hint(group.run_dir)}") from None
    finally:
        group.close()


def _resume_hint(run_dir) -> str:
    found = checkpoint.list_checkpoints(run_dir) if run_dir else []
    if not found:
        return "The run stopped before its first checkpoint"
    return (f"The run stopped; its last checkpoint {found[0]} is intact: continue with "
            f"xlstm train --resume {run_dir} (on any number of processes)")
