"""``xlstm train``: a character- or word-level language model, trained by truncated BPTT.

    Embedding -> LSTM (layers, LayerNorm, recurrent dropout, zoneout) -> Dense -> softmax cross-entropy

The corpus is cut into ``--batch`` streams read in windows of ``--seq-len`` tokens, the LSTM
state carried from window to window; Adam with global-norm clipping and a warm-up + cosine
learning rate. Without ``--text`` it trains on the Python standard library's source (no
download). Checkpoints (see ``xlstm/checkpoint.py``) hold everything a run depends on, so
``--resume`` continues exactly: the resumed losses equal an uninterrupted run's (tested on
the CPU; on the GPU every gradient is summed in a fixed order, no atomics, and the gpu tests
in tests/test_train.py check the same there).
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

from .. import backends, checks
from ..backends import blas
from . import checkpoint, data, distributed
from ..errors import InputError, XlstmError

# Defaults of the README's main job: measured on a 2-core CPU to finish in under 3 minutes
# with a validation loss well below the unigram entropy (see the README).
DEFAULTS = dict(level="char", hidden=256, layers=1, embed=64, layer_norm=False, dropout=0.0,
                zoneout=0.0, seq_len=64, batch=32, steps=None, epochs=None, lr=5e-3, warmup=50,
                schedule="cosine", clip=1.0, weight_decay=0.0, seed=0, dtype="float32", precision="float32",
                val_fraction=0.1, text=None, encoding="utf-8", max_chars=None, vocab_size=5000,
                eval_every=100, eval_tokens=40_000, save_every=200, keep=3, log_every=10)
DEFAULT_STEPS = 800
# options that only steer the run (may differ on --resume); every other option is part of
# what a checkpoint continues and must match it
RUN_CONTROL = {"steps", "epochs", "eval_every", "eval_tokens", "save_every", "keep", "log_every"}


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
    g.add_argument("--warmup", type=int, metavar="N", help="linear warm-up steps (default 50)")
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


# -- configuration ---------------------------------------------------------------------------
def _given(args) -> dict:
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if "steps" in given and "epochs" in given:
        raise InputError("give --steps or --epochs, not both")
    if "text" in given:
        given["text"] = os.path.abspath(given["text"])     # a resumed run may start from another folder
    return given


def _check_config(c: dict) -> None:
    """Refuse nonsensical sizes up front, naming the option."""
    def opt(k):
        return "--" + k.replace("_", "-")
    for k in ("hidden", "layers", "embed", "seq_len", "batch", "eval_every", "save_every", "keep", "log_every"):
        if isinstance(c[k], bool) or not isinstance(c[k], int) or c[k] < 1:
            raise InputError(f"{opt(k)} must be a positive integer, got {c[k]!r}")
    for k in ("steps", "max_chars"):
        if c[k] is not None and c[k] < 1:
            raise InputError(f"{opt(k)} must be a positive integer, got {c[k]!r}")
    if c["epochs"] is not None and not (c["epochs"] > 0 and math.isfinite(c["epochs"])):
        raise InputError(f"--epochs must be a positive number, got {c['epochs']!r}")
    if c["vocab_size"] < 2:
        raise InputError(f"--vocab-size must be at least 2, got {c['vocab_size']!r}")
    if c["eval_tokens"] < 0:
        raise InputError(f"--eval-tokens must be 0 (all) or positive, got {c['eval_tokens']!r}")
    if c["warmup"] < 0:
        raise InputError(f"--warmup must be 0 or positive, got {c['warmup']!r}")
    for k in ("lr", "clip"):
        if not (c[k] > 0 and math.isfinite(c[k])):
            raise InputError(f"{opt(k)} must be a positive number, got {c[k]!r}")
    if not (c["weight_decay"] >= 0 and math.isfinite(c["weight_decay"])):
        raise InputError(f"--weight-decay must be 0 or positive, got {c['weight_decay']!r}")
    for k in ("dropout", "zoneout"):
        if not 0.0 <= c[k] < 1.0:
            raise InputError(f"{opt(k)} must be a probability in [0, 1), got {c[k]!r}")
    if not 0.0 < c["val_fraction"] <= 0.5:
        raise InputError(f"--val-fraction must lie in (0, 0.5], got {c['val_fraction']!r}")
    if c.get("precision", "float32") != "float32" and c["dtype"] != "float32":
        raise InputError(f"--precision {c['precision']} rounds float32 GEMM operands, so it needs --dtype float32 "
                         f"(got --dtype {c['dtype']}); drop one of the two options")
    if c["layer_norm"] and importlib.util.find_spec("xlstm.layernorm") is None:
        raise InputError("--layer-norm needs xlstm/layernorm.py, which this installation lacks; "
                         "train without --layer-norm or update xlstm")


def _merge_resumed(saved: dict, given: dict, where: str) -> dict:
    """The checkpoint's config, with run-control options overridden; anything else must match."""
    cfg = dict(DEFAULTS)
    cfg.update(saved)
    for k, v in given.items():
        if k in RUN_CONTROL:
            cfg[k] = v
        elif saved.get(k, DEFAULTS.get(k)) != v:     # an option older checkpoints lack had its default
            opt = "--" + k.replace("_", "-")
            raise InputError(f"the checkpoint {where} was trained with {opt} {saved.get(k, DEFAULTS.get(k))!r}, "
                             f"but {opt} {v!r} was "
                             "given; drop the option to continue that run, or start a new run with another --out")
    if "steps" in given and "epochs" not in given:
        cfg["epochs"] = None
    elif "epochs" in given and "steps" not in given:
        cfg["steps"] = None
    return cfg


def _new_out_dir() -> str:
    for i in range(1, 10_000):
        d = os.path.join("runs", f"xlstm-{i:03d}")
        if not os.path.exists(d):
            return d
    raise InputError("runs/ has 9999 runs; pass --out DIR")


# -- the model -------------------------------------------------------------------------------
def build_model(cfg: dict, vocab_size: int, backend):
    """Embedding -> LSTM -> Dense, seeded from the config's seed."""
    from ..layers import Dense, Embedding, Sequential
    from ..lstm import LSTM

    seed, dt = int(cfg["seed"]), cfg["dtype"]
    model = Sequential(
        Embedding(vocab_size, cfg["embed"], dtype=dt, seed=[seed, 10], backend=backend),
        LSTM(cfg["embed"], cfg["hidden"], num_layers=cfg["layers"], layer_norm=cfg["layer_norm"],
             recurrent_dropout=cfg["dropout"], zoneout=cfg["zoneout"], dtype=dt, seed=seed, backend=backend),
        Dense(cfg["hidden"], vocab_size, dtype=dt, seed=[seed, 11], backend=backend))
    model.precision = cfg.get("precision") or "float32"     # checkpoints before precision modes: float32
    return model


def lstm_of(model):
    return model[1]


def load_model(path: str, backend=None, warn=print):
    """(model in eval mode, vocab, meta, folder) from a checkpoint or run folder, on ``backend``."""
    backend = backends.resolve(backend)        # an unusable --backend cupy is reported first
    folder, arrays, meta = checkpoint.load_latest(path, warn=warn)
    vocab = data.Vocab.from_json(meta.get("vocab"))
    cfg = dict(DEFAULTS)
    cfg.update(meta.get("config") or {})
    try:
        model = build_model(cfg, len(vocab), backend)
        model.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
    except InputError as e:
        if isinstance(e, checkpoint.CheckpointError):
            raise
        raise checkpoint.CheckpointError(f"checkpoint {folder} does not fit its own config "
                                         f"(incompatible or damaged): {e}") from None
    return model.eval(), vocab, meta, folder


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
    for p in range(0, L - 1, seq_len):
        x = np.ascontiguousarray(streams[:, p:min(p + seq_len, L - 1)].T)
        y = np.ascontiguousarray(streams[:, p + 1:p + 1 + x.shape[0]].T)
        logits = model.forward(x, state=state)
        state = model.last_state
        # summed on the device in float64, as the host would, and read once at the end
        loss, _ = cross_entropy(logits, y, on_device=True)
        total = total + loss * y.size
        count += y.size
    model.train(was_training)
    return (read_floats(model.backend, [total])[0] if count else 0.0), count


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


class _CtrlC:
    """First Ctrl-C: finish the current step, save, stop. Second: stop at once (last checkpoint stays)."""

    def __init__(self, say):
        self.requested, self.say, self._old = False, say, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("Ctrl-C: finishing this step, then saving a checkpoint (press Ctrl-C again to quit without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# -- metrics and plot -------------------------------------------------------------------------
class Metrics:
    """metrics.jsonl in the run folder: one JSON object per line (train or val record)."""

    def __init__(self, run_dir: str, resume_step: int | None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # drop what was logged after the checkpoint: those steps run again now
            keep = [r for r in self.read(self.path) if r.get("step", 0) <= resume_step]
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
                         "pip install matplotlib (or 'xlstm[plot]'), or drop --plot")


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
        # copied again, so the snapshot never shares memory with a live state (issue 9)
        arrays["carry/h"], arrays["carry/c"] = (np.array(a, copy=True) for a in carry)
    return arrays


class _Discard:
    """Metrics of a process other than rank 0: only rank 0 writes."""

    path = None

    def append(self, rec) -> None:
        pass


def run(args) -> int:
    if getattr(args, "nproc", None) is not None:
        if distributed.launched():
            raise InputError("--nproc starts the processes itself; under torchrun drop --nproc")
        return distributed.launch(args.nproc, getattr(args, "argv", None) or sys.argv[1:])
    t_start = time.time()
    # an unusable --backend cupy stops here, with the reason; under torchrun each process takes its own GPU
    backend, group = distributed.setup(args.backend, getattr(args, "dist_timeout", distributed.DEFAULT_TIMEOUT_S))
    group.run_dir = None
    try:
        return _run(args, t_start, backend, group)
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


def train_step(model, opt, x, y, carry, clip: float, group=None, batch=None):
    """One optimiser step of the language model: (loss, grad norm before clipping, carried state).

    x, y [T, B] token ids (this process's streams, on the host); carry: the LSTM state from the
    last window or None. zero_grad -> forward -> cross-entropy -> backward -> all-reduce -> clip
    -> Adam (opt.lr set by the caller). batch: the global batch (masks of a distributed run).
    Nothing here waits for the device: loss (this process's mean) and norm are 0-d float64
    arrays of the model's backend, and checks of device inputs are queued where
    ``checks.deferred()`` is active; ``read_floats`` reads them at the next log interval.
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


def read_floats(backend, values) -> list[float]:
    """0-d arrays of ``backend`` as Python floats, in one device->host transfer."""
    if not values:
        return []
    xp = backend.xp
    return [float(v) for v in backend.to_numpy(xp.stack([xp.asarray(v, dtype=np.float64) for v in values]))]


def _run(args, t_start, backend, group) -> int:
    given = _given(args)
    if args.threads < 0:
        raise InputError(f"--threads must be 0 (BLAS default) or positive, got {args.threads}")
    if args.threads and backend.name == "numpy":
        blas.set_threads(args.threads)
    if args.plot:
        _require_matplotlib()
    resumed = None
    if args.resume:
        folder, arrays, meta = checkpoint.load_latest(args.resume, warn=lambda s: print(s, file=sys.stderr))
        cfg = _merge_resumed(meta.get("config") or {}, given, folder)
        run_dir = args.out or (os.path.dirname(os.path.abspath(folder)) if checkpoint.checkpoint_step(folder) is not None
                               else args.resume)
        resumed = (folder, arrays, meta)
    else:
        cfg = dict(DEFAULTS)
        cfg.update(given)
        run_dir = args.out or _new_out_dir()
        if checkpoint.list_checkpoints(run_dir):
            raise InputError(f"{run_dir} already holds checkpoints of a run; continue it with --resume {run_dir}, "
                             "or choose another --out")
    _check_config(cfg)
    if cfg["batch"] % group.world:
        raise InputError(f"--batch {cfg['batch']} cannot be split evenly over {group.world} processes: each "
                         f"takes --batch / {group.world} streams; give a --batch that is a multiple of {group.world}")
    run_dir = group.run_dir = group.broadcast(run_dir)     # rank 0 names the run folder
    if cfg["steps"] is None and cfg["epochs"] is None:
        cfg["steps"] = DEFAULT_STEPS

    text, desc = _corpus(cfg)
    corpus_sha = data.fingerprint(text)
    if resumed:
        if resumed[2].get("corpus", {}).get("sha256") != corpus_sha:
            what = ("--text" if cfg["text"] else "default corpus (this Python's standard library source); "
                    "resume with the same Python installation")
            raise InputError(f"the training text differs from the one the checkpoint {resumed[0]} was trained on "
                             f"({desc}); resume with the same {what}, or start a new run")
        vocab = data.Vocab.from_json(resumed[2].get("vocab"))
    else:
        vocab = None
    toks = data.tokenize(text, cfg["level"])
    if vocab is None:
        vocab = data.Vocab.build(toks, cfg["level"], cfg["vocab_size"])
    ids = vocab.encode(toks)
    del toks
    unigram = data.unigram_entropy(ids, len(vocab))
    train_ids, val_ids = data.split(ids, cfg["val_fraction"], cfg["seq_len"], cfg["batch"])
    stream = data.BatchStream(train_ids, cfg["seq_len"], cfg["batch"], seed=cfg["seed"])
    val = data.eval_streams(val_ids, max(cfg["batch"], 64), cfg["eval_tokens"] or None)
    mine = distributed.shard(cfg["batch"], group.rank, group.world)     # this process's training streams
    val = val[distributed.shard(len(val), group.rank, group.world)]
    total = cfg["steps"] if cfg["steps"] is not None else max(1, math.ceil(cfg["epochs"] * stream.windows_per_epoch))
    warmup = min(cfg["warmup"], total // 10)     # a short run must not spend itself warming up

    from ..optim import Adam, lr_schedule

    model = build_model(cfg, len(vocab), backend)
    lstm = lstm_of(model)
    opt = Adam(model, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, carry, elapsed0, last_val = 0, None, 0.0, None
    if resumed:
        folder, arrays, meta = resumed
        try:
            model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("param/")})
            ost = {}
            for k, v in arrays.items():
                if k.startswith("opt/"):
                    name, buf = k[4:].rsplit("/", 1)
                    ost.setdefault(name, {})[buf] = v
            opt.load_state_dict({"step": meta["optimizer"]["step"], "hyper": meta["optimizer"]["hyper"], "state": ost})
            lstm._mask_rng.bit_generator.state = meta["rng"]["mask"]
            stream.load_state_dict(meta["rng"]["stream"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, XlstmError):
                raise checkpoint.CheckpointError(f"checkpoint {folder} is incompatible with this run: {e}") from None
            raise checkpoint.CheckpointError(f"checkpoint {folder} is incomplete or damaged (missing {e}); "
                                             "use an earlier checkpoint") from None
        if "carry/h" in arrays:
            # stored for every stream: a run resumes on any number of processes
            carry = tuple(backend.asarray(np.ascontiguousarray(arrays[k][:, mine])) for k in ("carry/h", "carry/c"))
        step, elapsed0 = int(meta["step"]), float(meta.get("elapsed_s", 0.0))
        last_val = meta.get("val_loss")
    # every parameter and gradient a view of one flat buffer: clipping scales it in one pass and
    # Adam updates all at once (a distributed group re-flattens the gradients for its all-reduce)
    distributed.FlatParams(model)
    distributed.FlatGrads(model)
    group.attach(model)
    if group.main:
        os.makedirs(run_dir, exist_ok=True)
        metrics = Metrics(run_dir, step if resumed else None)
    else:
        metrics = _Discard()

    def say(*a, **kw):
        if group.main:
            print(*a, **kw)
    say(f"xlstm train: {desc}; {cfg['level']} level, {len(ids):,} tokens, vocabulary {len(vocab)}")
    say(f"  model: Embedding({len(vocab)}, {cfg['embed']}) -> {lstm} -> Dense({cfg['hidden']}, {len(vocab)}); "
        f"{sum(int(p.size) for p in model.params.values()):,} parameters")
    say(f"  unigram entropy of the corpus: {unigram:.4f} nats/token (the loss to beat); "
        f"{total} steps of {cfg['batch']}x{cfg['seq_len']} tokens "
        f"({total / stream.windows_per_epoch:.2f} epochs); run folder {run_dir}")
    if cfg.get("precision", "float32") != "float32":
        say(f"  precision {cfg['precision']}: GEMM operands rounded to {cfg['precision']}, float32 accumulation, "
            "state and weights"
            + ("; EMULATED on the numpy backend (slower than float32, for checking, not speed)"
               if backend.name == "numpy" else ""))
    if group.world > 1:
        say(f"  data-parallel on {group.world} processes ({group.name}): {cfg['batch'] // group.world} streams each")
    if resumed:
        say(f"  resuming from {resumed[0]} at step {step}")
        if step >= total:
            say(f"  the run already has {step} of {total} steps; give a larger --steps to train longer")
            return 0

    def meta_now():
        return {"config": cfg, "vocab": vocab.to_json(),
                "corpus": {"description": desc, "sha256": corpus_sha, "tokens": int(len(ids))},
                "optimizer": {k: v for k, v in opt.state_dict().items() if k != "state"} | {"type": "Adam"},
                "rng": {"mask": lstm._mask_rng.bit_generator.state, "stream": stream.state_dict()},
                "elapsed_s": elapsed0 + time.time() - t_loop, "val_loss": last_val,
                "unigram_entropy": unigram, "total_steps": total, "backend": backend.name,
                "processes": group.world,
                "xlstm_version": __import__("xlstm").__version__}

    def save():
        full = None if carry is None else tuple(group.gather_streams(a, backend) for a in carry)
        group.check_same_params(model, step)
        if not group.main:
            return None
        return checkpoint.save(run_dir, step, _state_arrays(model, opt, full), meta_now(), keep=cfg["keep"])

    def validate():
        nonlocal last_val
        total_nats, count = group.sum(eval_sums(model, val, cfg["seq_len"]))
        last_val = total_nats / count
        metrics.append({"split": "val", "step": step, "loss": last_val, "ppl": data.perplexity(last_val),
                        "elapsed_s": round(elapsed0 + time.time() - t_loop, 3)})
        if group.main:
            bar.write(f"step {step:>6}: val loss {last_val:.4f} nats (ppl {data.perplexity(last_val):.2f}); "
                      f"unigram entropy {unigram:.4f}; {_versus(last_val, unigram)}")

    tokens_per_step = cfg["batch"] * cfg["seq_len"]
    bar = _bar(total, step, args.progress and group.main)
    t_loop = time.time()
    ema, rate, interrupted = None, None, False
    # (step, loss, grad norm, lr) of the steps not yet read: on a GPU the device runs ahead of
    # Python until the next log, validation or checkpoint reads them, all in one transfer
    pending, t_read = [], time.perf_counter()

    def read_pending():
        nonlocal ema, rate, t_read
        if not pending:
            return
        checks.flush()          # the deferred input checks raise here, naming the input
        vals = read_floats(backend, [p[1] for p in pending] + [p[2] for p in pending])
        n = len(pending)
        losses = [v / group.world for v in group.sum(vals[:n])]   # equal shares: the mean over all B*T tokens
        now = time.perf_counter()
        r = tokens_per_step * n / max(now - t_read, 1e-9)
        rate, t_read = (r if rate is None else 0.9 * rate + 0.1 * r), now
        for (s, _, _, lr), loss, norm in zip(pending, losses, vals[n:]):
            if not math.isfinite(loss):
                bar.close()
                raise XlstmError(f"the training loss became {loss} at step {s}; lower --lr "
                                 f"(now {cfg['lr']}) or --clip; the checkpoints in {run_dir} are from before")
            ema = loss if ema is None else 0.95 * ema + 0.05 * loss
            if s % cfg["log_every"] == 0 or s == total:
                metrics.append({"split": "train", "step": s, "loss": loss, "lr": lr, "grad_norm": norm,
                                "tokens_per_s": round(rate, 1), "elapsed_s": round(elapsed0 + time.time() - t_loop, 3)})
        pending.clear()
        bar.set_postfix_str(f"loss {ema:.3f}, {rate:,.0f} tok/s", refresh=False)

    with _CtrlC(lambda s: group.main and bar.write(s)) as ctrl_c, checks.deferred():
        while step < total:
            x, y, reset = stream.next()
            if reset:
                carry = None        # a new epoch starts from zeros, deterministically
            x, y = np.ascontiguousarray(x[:, mine]), np.ascontiguousarray(y[:, mine])
            opt.lr = lr_schedule(step, cfg["lr"], warmup, total, cfg["schedule"])
            loss, norm, carry = train_step(model, opt, x, y, carry, cfg["clip"], group, cfg["batch"])
            step += 1
            pending.append((step, loss, norm, opt.lr))
            bar.update(1)
            if args.stop_after is not None and step >= args.stop_after and step < total:
                ctrl_c.requested = True
            stop = group.any(ctrl_c.requested)        # all processes stop after the same step
            if (step % cfg["log_every"] == 0 or step % cfg["eval_every"] == 0 or step == total or stop
                    or step % cfg["save_every"] == 0):
                read_pending()      # before anything is validated or saved
            if step % cfg["eval_every"] == 0 or step == total:
                validate()
                checks.flush()
            if stop:
                interrupted = True
                break
            if step % cfg["save_every"] == 0 and step < total:
                save()
        read_pending()
        path = save()
    bar.close()
    secs = time.time() - t_start
    if args.plot and group.main:
        say(f"  plot: {write_plot(run_dir, unigram)}")
    if interrupted:
        say(f"interrupted at step {step} of {total}; checkpoint saved to {path}\n"
            f"  continue with: xlstm train --resume {run_dir}")
        return 130
    where = f"backend {backend.name}" + (f", {group.world} processes" if group.world > 1 else "")
    say(f"done: {total} steps in {secs:.1f} s ({where}); final val loss {last_val:.4f} nats "
        f"(ppl {data.perplexity(last_val):.2f}) vs unigram entropy {unigram:.4f} nats: {_versus(last_val, unigram)}")
    say(f"  checkpoint {path}; metrics {metrics.path}\n  sample with: xlstm sample {run_dir} --prime 'def ' --length 300")
    return 0
