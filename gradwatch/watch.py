"""``gradwatch.watch`` and the :class:`Watch` handle every integration adapts.

``watch()`` has one body (:func:`watch_with`): ``gradwatch.watch`` passes it the plugin
dispatch, ``gradwatch_torch.watch`` / ``gradwatch_tf.watch`` their own ``attach``. A
``Watch`` owns the :class:`~gradwatch.Monitor` for the whole run and the backend's
attachment while there is one: a callback (Keras ``fit``, Lightning, Hugging Face) makes
its attachment when training starts and hands it to the same ``Watch``, so records,
events and state live in one place however the user trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pluggy

from gradwatch import _exit
from gradwatch._state import STATE_VERSION, check_version
from gradwatch.attachment import Attachment
from gradwatch.errors import GradwatchError
from gradwatch.events import GradEvent
from gradwatch.monitor import Monitor
from gradwatch.plugins import get_plugin_manager, installed_backends_text
from gradwatch.records import StepRecord

if TYPE_CHECKING:  # option names completed by IDEs (PEP 692); nothing imported at run time
    from typing_extensions import Unpack

    from gradwatch._typing import WatchOptions

__all__ = ["Watch", "WatchFront", "watch", "watch_with"]


class Watch:
    """A watch on one model: records, events, state, and ``close()``.

    Returned by :func:`watch`. It owns the backend's attachment (all hooks), when there is
    one, and the :class:`Monitor` (all statistics and sinks); it holds no strong reference
    to the model.
    """

    def __init__(self, monitor: Monitor, attachment: Attachment | None = None) -> None:
        self.monitor = monitor
        self._attachment: Attachment | None = None
        #: Backend state kept while no attachment is live (between two Keras fits, say).
        self._backend_state: dict[str, Any] = {}
        self._closed = False
        # Closed at interpreter exit if still open (before its monitor: statistics still
        # pending on the device reach the host first); weakly held.
        _exit.track(self, order=0)
        if attachment is not None:
            self.attach(attachment)

    @property
    def backend(self) -> str:
        return str(getattr(self._attachment, "backend", None) or self.monitor.meta.get("backend") or "?")

    @property
    def attachment(self) -> Attachment | None:
        """The live attachment (hooks on a model), or None between two attachments."""
        return self._attachment

    def attach(self, attachment: Attachment) -> None:
        """Own ``attachment`` (made later than the watch, e.g. at a callback's train start);
        backend state kept from a previous attachment is handed to it."""
        if self._closed:
            attachment.close()
            raise GradwatchError("This watch is closed; create a new one to attach again.")
        if self._attachment is not None:
            attachment.close()
            raise GradwatchError("This watch already has a live attachment; detach() it first.")
        self._attachment = attachment
        if self._backend_state:
            attachment.load_state_dict(self._backend_state)

    def detach(self) -> None:
        """Close the live attachment (every hook removed) but keep the run going: records,
        events, the monitor's state and the backend's state stay with the watch."""
        att, self._attachment = self._attachment, None
        if att is None:
            return
        try:
            att.sync()
            self._backend_state = dict(att.state_dict())
        finally:
            att.close()

    def release(self) -> Attachment | None:
        """Give up the live attachment *without closing it* and return it: the watch keeps
        its backend state (as after :meth:`detach`), the caller owns the attachment from
        now on and either :meth:`attach`\\ es it again or closes it. Sync it first if
        statistics may be pending. A Keras callback keeps its traced step alive between
        two ``fit`` calls this way."""
        att, self._attachment = self._attachment, None
        if att is not None:
            self._backend_state = dict(att.state_dict())
        return att

    def _sync(self) -> None:
        if self._attachment is not None:
            self._attachment.sync()

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

    @property
    def latest_profile(self) -> StepRecord | None:
        """The newest record with through-time data (``temporal``), or None: only profiled
        steps carry it (``profile_every``), so ``records[-1].temporal`` is often ``{}``."""
        return _latest_profile(self.records)

    @property
    def latest_propagation(self) -> StepRecord | None:
        """The newest record with a propagation measurement (some layer's ``temporal``
        has ``recurrences``), or None. Not always :attr:`latest_profile`: the replay of a
        large layer is spaced over several profiled steps by its cost (and a step read
        while none could run has none), so a profiled step may carry the sensitivity
        (``norms``) with ``recurrences == {}``, ``horizon`` None; this is the step whose
        gains, rate and horizon are the newest."""
        return next((r for r in reversed(self.records) if any(t.recurrences for t in r.temporal.values())), None)

    def step(self) -> StepRecord | None:
        """Measure now: call after ``backward()`` and before ``optimizer.step()`` when no
        optimizer was given to :func:`watch`."""
        if self._closed:
            raise GradwatchError("This watch is closed; call gradwatch.watch(...) again to go on measuring.")
        if self._attachment is None:
            raise GradwatchError("This watch has no live attachment (training has not started, or it ended).")
        return self._attachment.step()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state (step counter, policy state, detector statistics,
        backend state); load it into a new watch to resume exactly."""
        self._sync()
        backend = self._attachment.state_dict() if self._attachment is not None else dict(self._backend_state)
        return {"version": STATE_VERSION, "monitor": self.monitor.state_dict(), "backend": backend}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also after a round trip through JSON)."""
        check_version(state, "Watch.load_state_dict")
        self.monitor.load_state_dict(state["monitor"])
        self._backend_state = dict(state.get("backend") or {})
        if self._attachment is not None:
            self._attachment.load_state_dict(self._backend_state)

    def close(self) -> None:
        """Remove every hook and wrapper, flush and close the sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _exit.untrack(self)
        try:
            self.detach()
        finally:
            self.monitor.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _repr_html_(self) -> str:
        """Notebook display: steps, norm sparkline, through-time table, last alerts."""
        from gradwatch.display import watch_html

        return watch_html(self)

    def plot(self) -> Any:
        """The report's main figure (global norm at every step kept, alerts on it) as a
        matplotlib Figure, shown inline in a notebook (needs ``gradwatch[plot]``)."""
        from gradwatch.display import plot

        return plot(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._attachment is not None else "detached")
        return f"<gradwatch.Watch backend={self.backend} step={self.monitor.step_count} {state}>"


def _latest_profile(records: list[StepRecord]) -> StepRecord | None:
    return next((r for r in reversed(records) if r.temporal), None)


def watch_with(
    attach: Callable[[Monitor], Attachment | None], model: object, *, plugin_manager: pluggy.PluginManager | None = None, **options: Any
) -> Watch:
    """The one body of every ``watch()``: build the monitor (options validated here,
    before any hook exists), let ``attach`` connect it, return the :class:`Watch`."""
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    monitor = Monitor(plugin_manager=pm, **options)
    try:
        attachment = attach(monitor)
    except BaseException:
        monitor.close()  # its sinks may already hold open files
        raise
    if attachment is None:
        monitor.close()
        t = type(model)
        names = installed_backends_text(pm)
        hint = ""
        if t.__module__.split(".")[0] in ("torch", "keras", "tensorflow"):
            hint = " Is the framework's backend installed, and is the model a torch.nn.Module or keras.Model?"
        raise GradwatchError(
            f"No gradwatch backend recognises an object of type '{t.__module__}.{t.__qualname__}'. "
            f"Installed backends: {names}.{hint} For other frameworks use gradwatch.Monitor(...).observe(grads)."
        )
    return Watch(monitor, attachment)


def watch(
    model: object,
    optimizer: object | None = None,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    **options: Unpack[WatchOptions],
) -> Watch:
    """Watch ``model``'s gradients (and act on them through ``optimizer``) with the
    backend that recognises it. Options are those of the README; a bad one raises
    :class:`~gradwatch.ConfigError` here, before training starts.

    PyTorch: with ``optimizer`` gradwatch runs inside ``optimizer.step()``; without it,
    call ``watch.step()`` after ``backward()``. Keras: intercepts ``optimizer.apply``
    (use ``gradwatch_tf.GradWatchCallback`` for ``fit``).
    """
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager()

    def attach(monitor: Monitor) -> Attachment | None:
        return pm.hook.gradwatch_attach(target=model, optimizer=optimizer, monitor=monitor)  # type: ignore[no-any-return]

    return watch_with(attach, model, plugin_manager=pm, **options)


class WatchFront:
    """What a training-framework callback offers *like a Watch*, by delegating to the
    :class:`Watch` it holds in ``self.watch``: the Keras, Lightning and Hugging Face
    callbacks read the same records, events and state, however the user trains.
    A callback adds its own ``close()`` (it has its trainer to give back first)."""

    watch: Watch

    @property
    def monitor(self) -> Monitor:
        return self.watch.monitor

    @property
    def records(self) -> list[StepRecord]:
        """Recent records, oldest first, at most ``keep`` (pending device statistics are
        read first)."""
        return self.watch.records

    @property
    def events(self) -> list[GradEvent]:
        """Events emitted so far (the most recent ``keep``)."""
        return self.watch.events

    @property
    def latest_profile(self) -> StepRecord | None:
        """The newest record with through-time data, or None (see :attr:`Watch.latest_profile`)."""
        return self.watch.latest_profile

    @property
    def latest_propagation(self) -> StepRecord | None:
        """The newest record with a propagation measurement, or None (see
        :attr:`Watch.latest_propagation`)."""
        return self.watch.latest_propagation

    def _repr_html_(self) -> str:
        return self.watch._repr_html_()

    def plot(self) -> Any:
        """See :meth:`Watch.plot`."""
        return self.watch.plot()

    def state_dict(self) -> dict[str, Any]:
        """The watch's plain JSON state, the same as a ``gradwatch.Watch``'s (Lightning
        stores it in every checkpoint, the Hugging Face Trainer in trainer_state.json)."""
        return self.watch.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (the trainers do it for you on resume)."""
        self.watch.load_state_dict(state)
