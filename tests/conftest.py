"""Shared test fixtures. Tests run on the NumPy backend unless marked ``gpu``."""
import numpy as np
import pytest

import xlstm
from xlstm.backends import cupy_unavailable_reason


@pytest.fixture(autouse=True)
def _numpy_backend(request):
    """Unit tests run on NumPy so results do not depend on the machine; gpu tests opt out."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with xlstm.use_backend("numpy"):
        yield


def pytest_collection_modifyitems(config, items):
    reason = cupy_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a usable CUDA GPU: {reason}")
    for item in items:
        # the marker, not ``"gpu" in item.keywords``: keywords also hold the names of the
        # parent nodes, so a checkout in a folder named gpu would skip every test
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A tiny text file (120 lines of 11 Python-ish words) for the `xlstm train` tests."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "None", "if", "else", "for", "in", "x", "y"]
    lines = [" ".join(rng.choice(words, 6)) + ":" for _ in range(120)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def host_lib(tmp_path_factory):
    """The CUDA kernels built for the host by g++ (support/kernels_host.py), or a skip naming the
    missing compiler."""
    from support import kernels_host

    return kernels_host.build_or_skip(tmp_path_factory, "host_kernels")


@pytest.fixture
def emulated(host_lib, monkeypatch):
    """(CupyBackend running on the host against the stand-in cupy, the stand-in's records)."""
    from support.standin import install_fakes
    from xlstm.backends.cupy_backend import CupyBackend

    fake = install_fakes(host_lib, monkeypatch, nvmath=False)
    return CupyBackend(), fake
