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
        feed(m, norms=np.array([n]))


def feed(m: Monitor, norms: Any = None, **stats: Any) -> Any:
    """One step from plain per-parameter norms (and any other StepStats fields)."""
    from gradwatch import StepStats

    sq = np.square(np.asarray(norms, dtype=np.float64))
    return m.process(StepStats(sq, **stats))
