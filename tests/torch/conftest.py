"""Fixtures of the torch backend tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch backend needs torch")


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state."""
    torch.manual_seed(0)
    yield
