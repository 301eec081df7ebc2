"""Helpers of the bench tests: a second NumPy backend posing as 'cupy', loading a benchmarks/ script."""
from __future__ import annotations

from xlstm.backends.numpy_backend import NumpyBackend


class SecondNumpy(NumpyBackend):
    """NumPy under the name 'cupy': the bench compares it against the NumPy backend's results,
    the path ``--backends numpy,cupy`` takes on a GPU machine (no torch on this 'device')."""
    name = "cupy"


def load_script(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks", name)
    spec = importlib.util.spec_from_file_location(name[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
