"""Exceptions raised by gradwatch.

Each error derives from :class:`GradwatchError` *and* from the builtin it resembles, so
code that already catches ``ValueError`` or ``FloatingPointError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ConfigError", "GradwatchError", "NonFiniteGradientError"]


class GradwatchError(Exception):
    """Base class of every error gradwatch raises on purpose."""


class ConfigError(GradwatchError, ValueError):
    """An option or argument has a value gradwatch cannot use.

    Raised at construction (never mid-training). ``option`` and ``value`` name what was
    wrong, so a caller can report it without parsing the message.
    """

    def __init__(self, message: str, *, option: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.option = option
        self.value = value


class NonFiniteGradientError(GradwatchError, FloatingPointError):
    """A gradient held NaN or Inf and ``on_nonfinite="raise"`` was chosen.

    Raised before the optimizer step changes anything, so the weights and optimizer state
    are exactly those of the previous step: the caller can inspect the batch, lower the
    learning rate or reload a checkpoint.
    """

    def __init__(self, message: str, *, step: int, params: Sequence[str], layer: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.params = tuple(params)
        self.param = self.params[0] if self.params else None
        self.layer = layer
