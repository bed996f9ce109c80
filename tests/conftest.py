import os

import pyro
import pytest
import torch

from pyro_bmr import _kernels, compiled_elbo

# Captured ELBO steps replay their graph as captured: torch.compile would spend
# seconds to minutes per small model on code that tests/test_compiled_elbo.py checks
# on its own ("inductor" against "fx" and the plain ELBO).
os.environ.setdefault(compiled_elbo.ENV_VAR, "fx")

# The tests' tensors are small: on two cores, a second intra-op thread mostly
# waits, and on a busy machine it makes SVI steps many times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts from an empty param store and fixed seeds."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def sparse_regression():
    """50 coefficients, 5 of them non-zero, n = 500, known noise 0.5."""
    g = torch.Generator().manual_seed(0)
    n, d = 500, 50
    X = torch.randn(n, d, generator=g)
    w = torch.zeros(d)
    w[:5] = torch.tensor([2.0, -1.5, 1.0, 3.0, -2.0])
    y = X @ w + 0.5 * torch.randn(n, generator=g)
    return X, y, w


@pytest.fixture
def kernels(monkeypatch, request):
    """Fresh compile state; eager kernels unless a test asks otherwise.

    A compiled kernel that raises falls back to the eager one with a warning, which
    would hide a broken compiled kernel behind a correct result: unless a test is
    marked ``compile_fallback``, no compile may have failed by its end.
    """
    monkeypatch.setattr(_kernels, "_compiled", {})
    monkeypatch.setattr(_kernels, "_failed", set())
    monkeypatch.setenv(_kernels.ENV_VAR, "0")
    yield monkeypatch
    if request.node.get_closest_marker("compile_fallback") is None:
        assert not _kernels._failed, f"a compiled kernel failed on {_kernels._failed}"
