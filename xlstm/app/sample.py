"""``xlstm sample`` (generate text from a checkpoint) and ``xlstm export`` (weights for PyTorch)."""
from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import sys

import numpy as np

from .. import backends
from . import checkpoint
from ..errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder (its newest good checkpoint) or a ckpt-* folder")
    if p.prog.endswith("export"):
        p.add_argument("--to", choices=("torch",), required=True, help="target framework")
        p.add_argument("--output", metavar="FILE", help="where to write (default: lstm-torch.pt next to the checkpoint)")
        p.add_argument("--full", action="store_true",
                       help="also write the embedding and output layer (keys embedding.*, lstm.*, decoder.*)")
        return
    p.add_argument("--prime", default=None, metavar="TEXT", help="text the sample continues (default: a newline)")
    p.add_argument("--length", type=int, default=500, metavar="N", help="tokens to generate (default 500)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="softmax temperature; lower is more conservative, 0 picks the likeliest token (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample only among the K likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="seed: the same seed gives the same text")
    p.add_argument("--backend", choices=backends.NAMES, help="numpy, cupy or auto (default: $XLSTM_BACKEND, else auto)")


def run(args) -> int:
    if args.command == "export":
        return _export(args)
    return _sample(args)


def _warn(s):
    print(s, file=sys.stderr)


def generate(model, vocab, prime: str, length: int, temperature: float = 0.8, top_k: int | None = None,
             seed=None) -> str:
    """``prime`` followed by ``length`` sampled tokens; the same seed gives the same text."""
    from .data import tokenize

    if length < 0:
        raise InputError(f"--length must be 0 or positive, got {length}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InputError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k must be a positive integer, got {top_k}")
    if not prime:
        prime = "\n" if "\n" in vocab.index else vocab.tokens[0]
    ids = vocab.encode(tokenize(prime, vocab.level), strict=vocab.level == "char")
    rng = np.random.default_rng(seed)
    model.eval()
    be = model.backend
    logits = model.forward(ids[:, None])                 # [T,1,V]: the prime sets the state
    out = []
    for _ in range(length):
        z = np.asarray(be.to_numpy(logits[-1, 0]), dtype=np.float64)
        if temperature == 0:
            nxt = int(np.argmax(z))
        else:
            z = z / temperature
            if top_k is not None and top_k < len(z):
                cut = np.partition(z, -top_k)[-top_k]
                z = np.where(z >= cut, z, -np.inf)
            p = np.exp(z - z.max())            # host-side softmax; -inf (cut by top-k) gives 0
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        out.append(nxt)
        logits = model.forward(np.array([[nxt]], dtype=np.int64), state=model.last_state)
    return prime + vocab.decode(out)


def _sample(args) -> int:
    model, vocab, meta, folder = checkpoint.load_model(args.checkpoint, backend=args.backend, warn=_warn)
    val = meta.get("val_loss")
    _warn(f"xlstm sample: {folder} (step {meta.get('step')}"
          + (f", val loss {val:.4f} nats)" if isinstance(val, (int, float)) else ")"))
    text = generate(model, vocab, args.prime, args.length, args.temperature, args.top_k, args.seed)
    sys.stdout.write(text + "\n")
    return 0


def _export(args) -> int:
    from ..interop import to_torch_state_dict

    if importlib.util.find_spec("torch") is None:
        raise InputError("export --to torch needs PyTorch, which is not installed; pip install torch")
    import torch

    model, vocab, meta, folder = checkpoint.load_model(args.checkpoint, backend="numpy", warn=_warn)
    lstm = model[1]
    if lstm.layer_norm:
        raise InputError(f"export --to torch: {folder} was trained with --layer-norm, and torch.nn.LSTM has no "
                         "layer norm; only models trained without --layer-norm can be exported to torch")
    sd = to_torch_state_dict(lstm)
    if args.full:
        emb, dense = model[0], model[2]
        sd = {**{"lstm." + k: v for k, v in sd.items()},
              "embedding.weight": emb.state_dict()["E"],
              "decoder.weight": dense.state_dict()["W"].T.copy(),     # torch Linear is [out, in]
              "decoder.bias": dense.state_dict()["b"]}
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(folder)), "lstm-torch.pt")
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, buf)
    try:
        checkpoint.write_atomic(out, buf.getvalue())
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}; choose another --output") from None
    print(f"wrote {out} ({len(sd)} tensors) from {folder}")
    print(f"  load it with: lstm = torch.nn.LSTM({lstm.input_size}, {lstm.hidden_size}, "
          f"num_layers={lstm.num_layers}); lstm.load_state_dict(torch.load({out!r})"
          + ("[...] (keys under 'lstm.')" if args.full else "") + ")")
    return 0
