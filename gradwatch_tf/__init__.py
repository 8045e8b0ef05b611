"""gradwatch for Keras 3 on TensorFlow: ``watch`` for custom loops, ``GradWatchCallback`` for fit.

Importing this package does not import TensorFlow (the plugin entry point lives here);
the two public names load it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradwatch_tf.callback import GradWatchCallback

__all__ = ["watch", "GradWatchCallback"]


def watch(model: Any, optimizer: Any | None = None, **options: Any) -> Any:
    """``gradwatch.watch`` without the backend dispatch (see API.md).

    Intercepts ``optimizer.apply`` (``apply_gradients`` goes through it) of ``optimizer``
    or, when it is None, of ``model.optimizer``; returns a ``gradwatch.Watch``.
    """
    import gradwatch
    from gradwatch.monitor import Monitor
    from gradwatch_tf.attach import attach

    monitor = Monitor(**options)
    try:
        attachment = attach(model, optimizer, monitor)
    except BaseException:
        close = getattr(monitor, "close", None)
        if callable(close):
            close()
        raise
    return gradwatch.Watch(monitor, attachment)


def __getattr__(name: str) -> Any:
    if name == "GradWatchCallback":
        from gradwatch_tf.callback import GradWatchCallback

        return GradWatchCallback
    raise AttributeError(f"module 'gradwatch_tf' has no attribute {name!r}")
