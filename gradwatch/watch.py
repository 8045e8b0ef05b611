"""``gradwatch.watch``: attach to a model through whichever backend recognises it."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import pluggy

from gradwatch.errors import GradwatchError
from gradwatch.events import GradEvent
from gradwatch.handles import Attachment
from gradwatch.monitor import Monitor
from gradwatch.plugins import backend_names, get_plugin_manager
from gradwatch.records import StepRecord

__all__ = ["Watch", "watch"]

STATE_VERSION = 1


class Watch:
    """A live watch on one model: records, events, state, and ``close()``.

    Returned by :func:`watch`. It owns the backend's attachment (all hooks) and the
    :class:`Monitor` (all statistics and sinks); it holds no strong reference to the model.
    """

    def __init__(self, monitor: Monitor, attachment: Attachment) -> None:
        self.monitor = monitor
        self._attachment = attachment
        self._closed = False

    @property
    def backend(self) -> str:
        return str(getattr(self._attachment, "backend", "?"))

    @property
    def attachment(self) -> Attachment:
        return self._attachment

    def _sync(self) -> None:
        if not self._closed:
            sync = getattr(self._attachment, "sync", None)
            if sync is not None:
                sync()

    @property
    def records(self) -> list[StepRecord]:
        """Recent records, oldest first, at most ``keep``; statistics still pending on
        the device are brought to the host first, so this is always up to date."""
        self._sync()
        return self.monitor.records

    @property
    def events(self) -> list[GradEvent]:
        """Events emitted so far (the most recent ``keep``)."""
        self._sync()
        return self.monitor.events

    def step(self) -> StepRecord | None:
        """Measure now: call after ``backward()`` and before ``optimizer.step()`` when no
        optimizer was given to :func:`watch`."""
        if self._closed:
            raise GradwatchError("This watch is closed; call gradwatch.watch(...) again to go on measuring.")
        return self._attachment.step()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state (step counter, policy state, detector statistics,
        backend state); load it into a new watch to resume exactly."""
        self._sync()
        # The backend first: one that keeps policy state on the device (TensorFlow runs
        # policies in-graph) copies it into the monitor's policy here.
        backend = self._attachment.state_dict()
        return {"version": STATE_VERSION, "monitor": self.monitor.state_dict(), "backend": backend}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also after a round trip through JSON)."""
        from gradwatch.errors import ConfigError

        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"gradwatch watch state version {state.get('version')!r} is not supported (expected {STATE_VERSION}).",
                option="state",
                value=state.get("version"),
            )
        self.monitor.load_state_dict(state["monitor"])
        self._attachment.load_state_dict(state.get("backend") or {})

    def close(self) -> None:
        """Remove every hook and wrapper, flush and close the sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._attachment.close()
        finally:
            self.monitor.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<gradwatch.Watch backend={self.backend} step={self.monitor.step_count} {state}>"


def watch(
    model: object, optimizer: object | None = None, *, plugin_manager: pluggy.PluginManager | None = None, **options: Any
) -> Watch:
    """Watch ``model``'s gradients (and act on them through ``optimizer``) with the
    backend that recognises it. Options are those of the README; a bad one raises
    :class:`~gradwatch.ConfigError` here, before training starts.

    PyTorch: with ``optimizer`` gradwatch runs inside ``optimizer.step()``; without it,
    call ``watch.step()`` after ``backward()``. Keras: intercepts ``optimizer.apply``
    (use ``gradwatch_tf.GradWatchCallback`` for ``fit``).
    """
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    monitor = Monitor(plugin_manager=pm, **options)
    try:
        attachment = pm.hook.gradwatch_attach(target=model, optimizer=optimizer, monitor=monitor)
    except BaseException:
        monitor.close()
        raise
    if attachment is None:
        monitor.close()
        t = type(model)
        installed = backend_names(pm)
        names = ", ".join(installed) if installed else "none (pip install 'gradwatch[torch]' or 'gradwatch[tf]')"
        hint = ""
        if t.__module__.split(".")[0] in ("torch", "keras", "tensorflow"):
            hint = " Is the framework's backend installed, and is the model a torch.nn.Module or keras.Model?"
        raise GradwatchError(
            f"No gradwatch backend recognises an object of type '{t.__module__}.{t.__qualname__}'. "
            f"Installed backends: {names}.{hint} For other frameworks use gradwatch.Monitor(...).observe(grads)."
        )
    return Watch(monitor, attachment)
