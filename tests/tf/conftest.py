"""Fixtures of the Keras backend tests (any KERAS_BACKEND; the TensorFlow-only modules
import TensorFlow themselves)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

keras = pytest.importorskip("keras", reason="the Keras backend needs Keras 3")
if keras.backend.backend() == "tensorflow":
    pytest.importorskip("tensorflow", reason="the Keras TensorFlow backend needs TensorFlow")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state and fresh layer-name counters
    (Keras numbers unnamed layers globally: names would depend on the tests before)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture(autouse=True)
def _profile_at_once(monkeypatch):
    """TensorFlow's ``fit`` traces its profile functions in the background by default
    (gradwatch_tf._tfhost): the tests read each profiled step's profile, so they trace at
    once (a test of the background itself sets it back)."""
    if keras.backend.backend() == "tensorflow":
        from gradwatch_tf import _kkept

        monkeypatch.setattr(_kkept, "BACKGROUND_COMPILE", False)
    yield
