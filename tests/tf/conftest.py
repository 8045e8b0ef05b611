"""Fixtures of the Keras / TensorFlow backend tests."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

tf = pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")
keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state and fresh layer-name counters
    (Keras numbers unnamed layers globally: names would depend on the tests before)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
