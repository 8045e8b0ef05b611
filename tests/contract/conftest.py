"""The backend contract suite: the same tests, run against each backend.

``pytest tests/contract --backend torch`` (or ``keras``) runs one backend; without the
option both run, each skipped with a reason when its framework is missing. ``make test``
runs them in separate processes: torch and TensorFlow are never loaded together there.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKENDS = ("torch", "keras")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", action="append", choices=BACKENDS, help="backend(s) the contract suite runs against")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--backend") or list(BACKENDS)
        metafunc.parametrize("backend", chosen, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest):
    name = request.param
    # Keras 3 runs on TensorFlow, JAX or torch (KERAS_BACKEND): it needs keras itself, and
    # the tests that only TensorFlow supports yet ask ``through_time`` below.
    needed = {"torch": "torch", "keras": "keras"}[name]
    if importlib.util.find_spec(needed) is None:
        pytest.skip(f"the {name} backend needs {needed}, which is not installed")
    from tests.contract import adapters

    return adapters.make(name)


@pytest.fixture
def through_time(backend):
    """The backend, for tests that need propagation through time (TemporalProfile):
    skipped with the reason where the backend does not measure it yet (Keras off
    TensorFlow)."""
    if backend.through_time_skip:
        pytest.skip(backend.through_time_skip)
    return backend
