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
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
