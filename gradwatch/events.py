"""Events: what gradwatch tells the user, at once, when something needs attention."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["EVENT_KINDS", "EventKind", "GradEvent"]

EventKind = Literal["vanishing", "exploding", "nonfinite", "clipped", "skipped"]
EVENT_KINDS: tuple[str, ...] = ("vanishing", "exploding", "nonfinite", "clipped", "skipped")


@dataclass(frozen=True, slots=True)
class GradEvent:
    """One alert. Plain Python values only, so sinks and plugins need no framework.

    ``severity`` is a :mod:`logging` level, passed straight to ``logger.log``.
    ``value`` is the number that tripped the detector and ``threshold`` the limit it
    crossed, in the same units. ``suppressed`` counts the alerts of the same kind and layer
    that rate limiting held back since the previous one was emitted, so repeats are
    counted, never silently lost. ``worse_when`` says which way ``value`` gets worse
    (``"higher"``: a norm or a gain; ``"lower"``: a horizon), so the rate limiter can let
    an alert through whose condition got markedly worse since the last one it admitted;
    None: repeats are only ever rate-limited.
    """

    kind: str
    step: int
    severity: int
    message: str
    layer: str | None = None
    param: str | None = None
    value: float | None = None
    threshold: float | None = None
    suppressed: int = 0
    worse_when: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The event as a dict of plain values (non-finite floats are kept as floats)."""
        return asdict(self)

    @property
    def level_name(self) -> str:
        return logging.getLevelName(self.severity)
