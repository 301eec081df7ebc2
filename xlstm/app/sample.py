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


def check_sampling(length: int, temperature: float, top_k: int | None) -> None:
    if length < 0:
        raise InputError(f"--length must be 0 or positive, got {length}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InputError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k must be a positive integer, got {top_k}")


def generate(model, vocab, prime: str, length: int, temperature: float = 0.8, top_k: int | None = None,
             seed=None) -> str:
    """``prime`` followed by ``length`` sampled tokens; the same seed gives the same text."""
    from .data import tokenize

    check_sampling(length, temperature, top_k)
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
    check_sampling(args.length, args.temperature, args.top_k)      # before the checkpoint is read
    model, vocab, meta, folder = checkpoint.load_model(args.checkpoint, backend=args.backend, warn=_warn)
    val = meta.get("val_loss")
    _warn(f"xlstm sample: {folder} (step {meta.get('step')}"
          + (f", val loss {val:.4f} nats)" if isinstance(val, (int, float)) else ")"))
    text = generate(model, vocab, args.prime, args.length, args.temperature, args.top_k, args.seed)
    sys.stdout.write(text + "\n")
    return 0


def torch_loader(path: str, full: bool) -> list[str]:
    """Python lines that load an ``xlstm export --to torch`` file into torch modules."""
    lines = ["import torch",
             f"ckpt = torch.load({path!r})",
             "lstm = torch.nn.LSTM(**ckpt['lstm_args'])",
             "lstm.load_state_dict(ckpt['lstm'])"]
    if full:
        lines += ["embedding = torch.nn.Embedding(*ckpt['embedding']['weight'].shape)",
                  "embedding.load_state_dict(ckpt['embedding'])",
                  "decoder = torch.nn.Linear(ckpt['decoder']['weight'].shape[1], ckpt['decoder']['weight'].shape[0])",
                  "decoder.load_state_dict(ckpt['decoder'])"]
    lines.append("tokens = ckpt['vocab']['tokens']    # token id -> text")
    return lines


def _export(args) -> int:
    from ..interop import to_torch_state_dict

    if importlib.util.find_spec("torch") is None:
        raise InputError("export --to torch needs PyTorch, which is not installed; pip install torch "
                         "(or the torch extra: pip install -e \".[torch]\")")
    import torch

    model, vocab, meta, folder = checkpoint.load_model(args.checkpoint, backend="numpy", warn=_warn)
    lstm = model[1]
    if lstm.layer_norm:
        raise InputError(f"export --to torch: {folder} was trained with --layer-norm, and torch.nn.LSTM has no "
                         "layer norm; only models trained without --layer-norm can be exported to torch")
    def tensors(d):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()}

    # module name -> its state dict, the constructor arguments of the LSTM, and the vocabulary
    # (token id -> text: vocab["tokens"][id]); only tensors, dicts, lists and strings, so
    # torch.load's default weights_only=True reads it
    out_obj = {"format": "xlstm-torch-export", "version": 1,
               "lstm_args": {"input_size": lstm.input_size, "hidden_size": lstm.hidden_size,
                             "num_layers": lstm.num_layers},
               "lstm": tensors(to_torch_state_dict(lstm)),
               "vocab": vocab.to_json()}
    if args.full:
        dense = model[2].state_dict()
        out_obj["embedding"] = tensors({"weight": model[0].state_dict()["E"]})
        out_obj["decoder"] = tensors({"weight": dense["W"].T.copy(), "bias": dense["b"]})   # torch Linear is [out, in]
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(folder)), "lstm-torch.pt")
    buf = io.BytesIO()
    torch.save(out_obj, buf)
    try:
        checkpoint.write_atomic(out, buf.getvalue())
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}; choose another --output") from None
    n = sum(len(v) for k, v in out_obj.items() if k in ("lstm", "embedding", "decoder"))
    print(f"wrote {out} ({n} tensors and the vocabulary of {len(vocab)} tokens) from {folder}")
    print("  load it with:\n" + "\n".join("    " + line for line in torch_loader(out, args.full)))
    return 0
