"""Every hook gradwatch calls, in one place.

Hooks that *decide* are ``firstresult=True`` and return ``X | None`` (None: "not mine,
ask the next plugin"). Hooks that *announce* return None. Announcing hooks fire once per
step or event with aggregated values, never per parameter, so a plugin costs at most one
call per step. A plugin whose hook raises is disabled after one ERROR log line.

Hooks are typed against small protocols (:mod:`gradwatch.view`): announcing hooks get a
read-only :class:`~gradwatch.view.MonitorView`, a backend's ``gradwatch_attach`` a
:class:`~gradwatch.view.MonitorPort`, never the concrete Monitor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gradwatch.attachment import Attachment
    from gradwatch.events import GradEvent
    from gradwatch.options import Options
    from gradwatch.policies import ClipPolicy
    from gradwatch.records import StepRecord
    from gradwatch.through_time.families import Recurrence
    from gradwatch.view import MonitorPort, MonitorView

PROJECT = "gradwatch"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookimpl", "hookspec"]


@hookspec
def gradwatch_register_policies() -> list[type[ClipPolicy]]:  # type: ignore[empty-body]
    """Return policy classes to add to the registry (each has a unique ``name``).

    Called when a Monitor resolves a ``policy="name"`` string. Lists are concatenated.
    """


@hookspec
def gradwatch_register_sinks() -> list[type[Any]]:  # type: ignore[empty-body]
    """Return sink classes (each with a ``scheme`` and ``from_spec(arg, view)``).

    Called when a Monitor resolves its ``sinks`` specs; ``"scheme:arg"`` picks the class.
    """


@hookspec
def gradwatch_register_detectors() -> list[type[Any]]:  # type: ignore[empty-body]
    """Return detector classes; each Monitor builds one of each with its Options.

    Called once per Monitor, at construction.
    """


@hookspec
def gradwatch_register_recurrences() -> list[Recurrence]:  # type: ignore[empty-body]
    """Return declarations of recurrent layers gradwatch does not know
    (:class:`gradwatch.through_time.families.Recurrence`: a module type, given as a class
    or as ``"module.Class"`` so the plugin needs no framework import, with ``decay=fn`` for
    a diagonal recurrence or ``step=True`` for a cell called in a loop).

    Called when a backend attaches to a model, to find the layers to probe through time.
    Lists are concatenated; a declaration registered in the process
    (``gradwatch_torch.register_recurrence``, ``gradwatch_tf.register_recurrence``) is
    matched first. Each backend takes the declarations whose class is one of its own: for
    a Keras layer (any Keras backend) ``decay(layer, x) -> log_a`` in ``keras.ops``, ``x``
    the probed sequences of its first input, and ``step=True`` is not supported.
    """


@hookspec(firstresult=True)
def gradwatch_attach(target: object, optimizer: object | None, monitor: MonitorPort) -> Attachment | None:
    """Attach ``monitor`` to ``target`` (and ``optimizer``) if this backend recognises it.

    Called by ``gradwatch.watch``. Recognise the target without importing a framework the
    user has not imported (look in ``sys.modules``). Return None to let another backend
    try; stops at the first non-None result.
    """


@hookspec(firstresult=True)
def gradwatch_resolve_policy(spec: object, options: Options) -> ClipPolicy | None:
    """Turn a ``policy=`` value the registry does not know into a policy object.

    Called at Monitor construction for strings not in the registry and for objects that
    are not policies. Return None to decline.
    """


@hookspec
def gradwatch_step_recorded(record: StepRecord, view: MonitorView) -> None:
    """Announce a step's record, right after detection and the clip decision.

    Called once per optimizer step, on every rank. Must be cheap: it runs on the training
    loop's hot path.
    """


@hookspec
def gradwatch_event(event: GradEvent, view: MonitorView) -> None:
    """Announce an event as it is emitted (after rate limiting)."""
