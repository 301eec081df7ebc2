"""The language model of ``xlstm train`` and its configuration: defaults, checks, and the model
a configuration builds (so a checkpoint can be turned back into the model it was trained as).

    Embedding(V, embed) -> LSTM(embed, hidden, layers, LayerNorm, dropout, zoneout) -> Dense(hidden, V)
"""
from __future__ import annotations

import math
import os

from ..errors import InputError

# Defaults of the README's main job: measured on a 2-core CPU to finish in under 3 minutes
# with a validation loss well below the unigram entropy (see the README).
DEFAULTS = dict(level="char", hidden=256, layers=1, embed=64, layer_norm=False, dropout=0.0,
                zoneout=0.0, seq_len=64, batch=32, steps=None, epochs=None, lr=5e-3, warmup=50,
                schedule="cosine", clip=1.0, weight_decay=0.0, seed=0, dtype="float32", precision="float32",
                val_fraction=0.1, text=None, encoding="utf-8", max_chars=None, vocab_size=5000,
                eval_every=100, eval_tokens=40_000, save_every=200, keep=3, log_every=10)
DEFAULT_STEPS = 800
# options that only steer the run (may differ on --resume); every other option is part of
# what a checkpoint continues and must match it (--warmup on --resume: the added steps' warm-up)
RUN_CONTROL = {"steps", "epochs", "eval_every", "eval_tokens", "save_every", "keep", "log_every"}


def option(key: str) -> str:
    return "--" + key.replace("_", "-")


def given_options(args) -> dict:
    """The configuration options given on the command line (None: not given)."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    if "steps" in given and "epochs" in given:
        raise InputError("give --steps or --epochs, not both")
    if "text" in given:
        given["text"] = os.path.abspath(given["text"])     # a resumed run may start from another folder
    return given


def check_config(c: dict) -> None:
    """Refuse nonsensical sizes up front, naming the option."""
    for k in ("hidden", "layers", "embed", "seq_len", "batch", "eval_every", "save_every", "keep", "log_every"):
        if isinstance(c[k], bool) or not isinstance(c[k], int) or c[k] < 1:
            raise InputError(f"{option(k)} must be a positive integer, got {c[k]!r}")
    for k in ("steps", "max_chars"):
        if c[k] is not None and c[k] < 1:
            raise InputError(f"{option(k)} must be a positive integer, got {c[k]!r}")
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
            raise InputError(f"{option(k)} must be a positive number, got {c[k]!r}")
    if not (c["weight_decay"] >= 0 and math.isfinite(c["weight_decay"])):
        raise InputError(f"--weight-decay must be 0 or positive, got {c['weight_decay']!r}")
    for k in ("dropout", "zoneout"):
        if not 0.0 <= c[k] < 1.0:
            raise InputError(f"{option(k)} must be a probability in [0, 1), got {c[k]!r}")
    if not 0.0 < c["val_fraction"] <= 0.5:
        raise InputError(f"--val-fraction must lie in (0, 0.5], got {c['val_fraction']!r}")
    if c.get("precision", "float32") != "float32" and c["dtype"] != "float32":
        raise InputError(f"--precision {c['precision']} rounds float32 GEMM operands, so it needs --dtype float32 "
                         f"(got --dtype {c['dtype']}); drop one of the two options")


def _shown(key: str, value) -> str:
    if key == "text" and value is None:
        return "the default corpus (no --text)"
    return f"{option(key)} {value!r}"


def merge_resumed(saved: dict, given: dict, where: str) -> dict:
    """The checkpoint's config, with run-control options overridden; anything else must match."""
    cfg = dict(DEFAULTS)
    cfg.update(saved)
    for k, v in given.items():
        if k in RUN_CONTROL or k == "warmup":
            if k in RUN_CONTROL:
                cfg[k] = v
            continue
        was = saved.get(k, DEFAULTS.get(k))      # an option older checkpoints lack had its default
        if was != v:
            raise InputError(f"the checkpoint {where} was trained with {_shown(k, was)}, but {_shown(k, v)} was "
                             "given; drop the option to continue that run, or start a new run with another --out")
    if "steps" in given and "epochs" not in given:
        cfg["epochs"] = None
    elif "epochs" in given and "steps" not in given:
        cfg["steps"] = None
    return cfg


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
