"""Small helpers for the core tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from gradwatch import Monitor
from gradwatch.plugins import make_plugin_manager


def monitor(**options: Any) -> Monitor:
    """A Monitor on a fresh plugin manager (no entry points), memory sink by default."""
    options.setdefault("sinks", ["memory"])
    return Monitor(plugin_manager=make_plugin_manager(load_entrypoints=False), **options)


def feed_global_norms(m: Monitor, norms: Iterable[float]) -> None:
    """Feed a sequence of global norms as a single-parameter model."""
    m.bind(["layer.w"])
    for n in norms:
        m.process(norms=np.array([n]))
