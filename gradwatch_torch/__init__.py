"""gradwatch for PyTorch: watch gradients of any ``nn.Module`` while it trains.

``gradwatch_torch.watch(model, optimizer, **options)`` is ``gradwatch.watch`` without the
backend dispatch. See ``gradwatch_torch.attach`` for what is measured and how.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from gradwatch import Watch

__all__ = ["watch"]


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, **options: Any) -> Watch:
    """Watch ``model``'s gradients; with ``optimizer``, inside every ``optimizer.step()``.

    Without ``optimizer`` call ``watch.step()`` after ``backward()`` and before
    ``optimizer.step()``. Options are those of ``gradwatch.watch`` (validated first, so
    a bad option raises ``gradwatch.ConfigError`` before any hook is installed).
    """
    from gradwatch import Monitor, Watch
    from gradwatch_torch.attach import attach

    monitor = Monitor(**options)
    try:
        attachment = attach(model, optimizer, monitor)
    except BaseException:
        monitor.close()  # its sinks may already hold open files
        raise
    return Watch(monitor, attachment)
