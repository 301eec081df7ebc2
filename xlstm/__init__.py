"""xlstm: an LSTM whose every forward value and BPTT gradient is explicit code, on NumPy or CuPy."""
from .backends import available_backends, get_backend, set_backend, use_backend
from .errors import BackendUnavailableError, InputError, StateError, XlstmError
from .lstm import LSTM
from . import gradcheck, interop, layers, losses, optim
from .layers import Dense, Embedding, Sequential

__version__ = "0.1.0"


def load(run_dir, backend=None):
    """A run of ``xlstm train``: its newest good checkpoint (``run_dir`` is a run folder or one
    ckpt-* folder) as ``(model, vocab, meta, folder)``, a named tuple.

    model: the trained ``Sequential(Embedding, LSTM, Dense)`` in eval mode, on ``backend`` (None:
    the current backend); vocab: ``vocab.encode(tokens) -> ids``, ``vocab.decode(ids) -> text``,
    ``vocab.tokens``, ``vocab.level`` ("char" or "word"); meta: the checkpoint's meta.json
    (config, step, validation loss). A damaged newest checkpoint is skipped with a warning.
    """
    import sys

    from .app.checkpoint import load_model
    return load_model(str(run_dir), backend=backend, warn=lambda s: print(s, file=sys.stderr))

__all__ = ["LSTM", "Dense", "Embedding", "Sequential", "layers", "losses", "optim", "set_backend", "get_backend", "use_backend", "available_backends",
           "interop", "gradcheck", "InputError", "StateError", "BackendUnavailableError",
           "XlstmError", "load", "__version__"]
