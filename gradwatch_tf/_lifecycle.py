"""What both Keras attachments share (TensorFlow's :class:`gradwatch_tf.attach.TFAttachment`
and the ``keras.ops`` one, :class:`gradwatch_tf.portable.PortableAttachment`): reporting
a failure once, holding wrappers that :meth:`resume` puts back, standing aside, the
manual step. Backend-neutral (no TensorFlow import)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gradwatch.errors import GradwatchError
from gradwatch.records import StepRecord
from gradwatch_tf._ring import RingReader

__all__ = ["Lifecycle"]

logger = logging.getLogger("gradwatch")


class Lifecycle(RingReader):
    """The attachment's lifecycle over the ring reader (see the module docstring)."""

    _handles: Any
    _wrappers: list[Callable[[], Callable[[], None]]]
    outside_fit: Callable[[], bool] | None
    _held_state: Any = None

    def _fail(self, part: str, exc: BaseException) -> None:
        """Log a failing part once (with its traceback); the caller disables it."""
        if part not in self._errors_logged:
            self._errors_logged.add(part)
            logger.error("gradwatch: %s failed and is now disabled: %r", part, exc, exc_info=exc)

    def _hold(self, wrap: Callable[[], Callable[[], None]]) -> None:
        """Apply ``wrap`` now, and again at each :meth:`resume`; its undo goes in the handles."""
        self._handles.add_callback(wrap())
        self._wrappers.append(wrap)

    def _stale(self) -> bool:
        """True (after restoring everything) when called outside the fit we serve."""
        check = self.outside_fit
        return check is not None and check()

    def step(self) -> StepRecord | None:
        """Keras has no manual measuring point: bring pending steps over, return the last."""
        self.sync()
        return self.last_record

    def _stand_aside(self) -> None:
        """Make the ops already traced into a step stand aside (scale 1, no skip) and give
        the policy state back to the host."""
        if not self._ready:
            return
        try:
            self._graph.active.assign(False)
            self._graph.halted.assign(False)
        except Exception as exc:  # noqa: BLE001 - deactivating is best effort
            self._fail("deactivating", exc)
        if self._graph.policy is not None:
            self._monitor.decide_on_device(None)  # the policy state goes back to the host

    def resume(self) -> None:
        """Undo ``suspend``: wrap the optimizer and the layers again (a retrace, e.g. for a
        new input shape, then includes gradwatch), activate the traced ops, and hand the
        policy state to the device again."""
        if self._closed:
            raise GradwatchError("This gradwatch attachment is closed; create a new one.")
        if not self._suspended:
            return
        try:
            for wrap in self._wrappers:
                self._handles.add_callback(wrap())
        except BaseException:
            self._handles.remove()
            raise
        self._suspended = False
        self._held_state = None
        if self._ready:
            self._graph.active.assign(True)
            if self._graph.policy is not None:
                self._monitor.decide_on_device(self._graph.policy)

    @property
    def model(self) -> Any:
        """The watched model (None once it no longer exists)."""
        return self._model_ref()
