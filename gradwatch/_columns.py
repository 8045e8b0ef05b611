"""The per-step columns of a run file: every step's global norm, at a few bytes a step.

Records reach the run file once per ``log_every`` steps (a window summarised, so that a
long run stays small), which leaves a 100-step run with two points per plot. Beside each
window's record the JSONL sink writes one ``"norms"`` line holding the window's steps
column by column::

    {"type": "norms", "first_step": 51, "values": [0.83, 0.91, ...],
     "clip_threshold": 1.0, "clip_scale": [1.0, 0.62, ...],
     "skipped_steps": [57], "nonfinite_steps": [57]}

``values[i]`` is the global norm (before gradwatch's clipping) of step ``first_step + i``; the steps
of one line are consecutive. ``clip_threshold`` / ``clip_scale`` are there when a policy
decided (a list, or one number when it was the same on every step of the window;
``null`` on a step without a decision); ``skipped_steps`` and ``nonfinite_steps`` list
the steps that were skipped or had a NaN/Inf in a gradient (``StepRecord.nonfinite``),
and are left out when empty. Numbers are written like every other float of the file
(shortest repr, NaN/Inf as strings), so the values equal the records' ``global_norm``
exactly. Measured size (``log_every=50``): about 20 bytes a step without a policy, 35 to
45 with one (its per-step scale, and its threshold when that moves).

:class:`StepColumns` builds a line (writer side); :class:`StepSeries` is the run's steps
assembled from the lines (reader side: what the report plots).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch.records import StepRecord

__all__ = ["StepColumns", "StepSeries"]


class StepColumns:
    """The steps of one window, column by column, until the sink writes them."""

    __slots__ = ("first_step", "nonfinite", "scales", "skipped", "thresholds", "values")

    def __init__(self) -> None:
        self.first_step = 0
        self.values: list[float] = []
        self.thresholds: list[float | None] | None = None
        self.scales: list[float | None] | None = None
        self.skipped: list[int] = []
        self.nonfinite: list[int] = []

    def __len__(self) -> int:
        return len(self.values)

    def add(self, r: StepRecord) -> None:
        """Append one step. The caller checks :meth:`follows` first and writes the
        line out when a step does not continue it (a monitor resumed mid-window)."""
        if not self.values:
            self.first_step = r.step
        n = len(self.values)
        self.values.append(r.global_norm)
        clip = r.clip
        if clip is not None and self.thresholds is None:
            self.thresholds, self.scales = [None] * n, [None] * n
        if self.thresholds is not None and self.scales is not None:
            self.thresholds.append(None if clip is None else clip.threshold)
            self.scales.append(None if clip is None else clip.scale)
        if r.skipped:
            self.skipped.append(r.step)
        if r.nonfinite:
            self.nonfinite.append(r.step)

    def follows(self, step: int) -> bool:
        """True if ``step`` continues this window's steps (or the window is empty)."""
        return not self.values or step == self.first_step + len(self.values)

    def line(self) -> dict[str, Any]:
        """The ``"norms"`` line (before the writer's encoding of non-finite floats)."""
        out: dict[str, Any] = {"type": "norms", "first_step": self.first_step, "values": self.values}
        if self.thresholds is not None and self.scales is not None:
            out["clip_threshold"] = _compact(self.thresholds)
            out["clip_scale"] = _compact(self.scales)
        if self.skipped:
            out["skipped_steps"] = self.skipped
        if self.nonfinite:
            out["nonfinite_steps"] = self.nonfinite
        return out


def _compact(column: Sequence[float | None]) -> Any:
    """One number for a column that holds the same value on every step."""
    first = column[0]
    if first is not None and all(v == first for v in column):
        return first
    return list(column)


@dataclass(frozen=True)
class StepSeries:
    """Every step of a run the file has per-step values for, in step order.

    ``step`` (int64), ``global_norm``, ``clip_threshold`` and ``clip_scale`` (float64, NaN
    where no policy decided), ``skipped`` and ``nonfinite`` (bool). ``per_step`` is False
    when the file has no ``"norms"`` lines (written before they existed): the series then
    holds the flushed records only, one per ``log_every`` steps.
    """

    step: np.ndarray
    global_norm: np.ndarray
    clip_threshold: np.ndarray
    clip_scale: np.ndarray
    skipped: np.ndarray
    nonfinite: np.ndarray
    per_step: bool = True

    def __len__(self) -> int:
        return int(self.step.size)

    @property
    def has_clip(self) -> bool:
        return bool(np.isfinite(self.clip_scale).any())

    @property
    def clipped(self) -> np.ndarray:
        """Steps a policy scaled down (scale < 1)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(self.clip_scale < 1.0)

    @classmethod
    def empty(cls, per_step: bool = True) -> StepSeries:
        f, b = np.zeros(0), np.zeros(0, dtype=bool)
        return cls(np.zeros(0, dtype=np.int64), f, f, f, b, b, per_step)

    @classmethod
    def from_columns(cls, by_step: dict[int, tuple[float, float, float, bool, bool]]) -> StepSeries:
        """From step -> (norm, threshold, scale, skipped, nonfinite)."""
        if not by_step:
            return cls.empty()
        steps = np.fromiter(sorted(by_step), dtype=np.int64, count=len(by_step))
        rows = [by_step[int(s)] for s in steps]
        cols = list(zip(*rows))
        return cls(
            steps,
            np.asarray(cols[0], dtype=np.float64),
            np.asarray(cols[1], dtype=np.float64),
            np.asarray(cols[2], dtype=np.float64),
            np.asarray(cols[3], dtype=bool),
            np.asarray(cols[4], dtype=bool),
        )

    @classmethod
    def from_records(cls, records: Sequence[StepRecord]) -> StepSeries:
        """The flushed records as a (coarse) series, for files without ``"norms"`` lines."""
        by_step: dict[int, tuple[float, float, float, bool, bool]] = {}
        for r in records:
            c = r.clip
            by_step[r.step] = (
                r.global_norm,
                math.nan if c is None else c.threshold,
                math.nan if c is None else c.scale,
                r.skipped,
                bool(r.nonfinite),
            )
        s = cls.from_columns(by_step)
        return cls(s.step, s.global_norm, s.clip_threshold, s.clip_scale, s.skipped, s.nonfinite, per_step=False)
