"""xlstm: an LSTM whose every forward value and BPTT gradient is explicit code, on NumPy or CuPy."""
from .backends import available_backends, get_backend, set_backend, use_backend
from .errors import BackendUnavailableError, InputError, StateError, XlstmError
from .lstm import LSTM
from . import gradcheck, interop, layers, losses, optim
from .layers import Dense, Embedding, Sequential

__version__ = "0.1.0"

__all__ = ["LSTM", "Dense", "Embedding", "Sequential", "layers", "losses", "optim", "set_backend", "get_backend", "use_backend", "available_backends",
           "interop", "gradcheck", "InputError", "StateError", "BackendUnavailableError",
           "XlstmError", "__version__"]
