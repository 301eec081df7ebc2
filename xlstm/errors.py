"""Errors raised by xlstm. Each message says what was wrong and what to do."""


class XlstmError(Exception):
    """Base class of every error xlstm raises on purpose."""


class InputError(XlstmError, ValueError):
    """An argument has the wrong rank, shape, dtype, backend or values (NaN/Inf)."""


class StateError(XlstmError, RuntimeError):
    """A call came in the wrong order, e.g. ``backward`` before ``forward``."""


class BackendUnavailableError(XlstmError, RuntimeError):
    """A backend was asked for explicitly but cannot run here; the message says why and how to fix it."""
