"""What both Keras attachments share (TensorFlow's :class:`gradwatch_tf.attach.TFAttachment`
and the ``keras.ops`` one, :class:`gradwatch_tf.portable.PortableAttachment`): reporting
a failure once, holding wrappers that :meth:`resume` puts back, standing aside, the
manual step. Backend-neutral (no TensorFlow import)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from gradwatch.attachment import warn_if_no_step
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.records import StepRecord
from gradwatch_tf._intercept import unwrap_optimizer, wrap_apply
from gradwatch_tf._ring import RingReader

__all__ = ["Lifecycle"]

logger = logging.getLogger("gradwatch")


class Lifecycle(RingReader):
    """The attachment's lifecycle over the ring reader (see the module docstring)."""

    _handles: Any
    _wrappers: list[Callable[[], Callable[[], None]]]
    outside_fit: Callable[[], bool] | None
    _held_state: Any = None

    def _wrap_optimizer(self) -> tuple[Any, Any] | None:
        """Hold the wrapper of the optimizer's ``apply`` (the one given, else the model's);
        returns (model, the optimizer as given), or None while the model has none yet."""
        model = self._model_ref()
        if model is None:
            raise GradwatchError("The model watched by gradwatch no longer exists.")
        outer = self._opt_arg if self._opt_arg is not None else getattr(model, "optimizer", None)
        if outer is None:
            return None
        opt = self._opt = unwrap_optimizer(outer)
        model_name = getattr(model, "name", "?")

        def wrap_optimizer() -> Callable[[], None]:
            self._original_apply, restore = wrap_apply(opt, model_name, self._apply, self._stale)
            return restore

        self._hold(wrap_optimizer)
        self._installed = True
        return model, outer

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
            # (numpy booleans: a Python one makes JAX compile a conversion, 10 ms a process)
            self._graph.active.assign(np.asarray(False))
            self._graph.halted.assign(np.asarray(False))
        except Exception as exc:  # noqa: BLE001 - deactivating is best effort
            self._fail("deactivating", exc)
        if self._graph.policy is not None:
            self._monitor.decide_on_device(None)  # the policy state goes back to the host

    def _leave(self) -> None:
        """Take gradwatch out of the step (the attachment adds what else it must undo)."""
        self._stand_aside()

    def close(self) -> None:
        """Bring pending steps over, restore the optimizer and every wrapped layer; idempotent."""
        if self._closed:
            return
        if self._ready:
            try:
                self.sync()
            except NonFiniteGradientError:
                pass
        self._closed = True
        live = getattr(self._monitor, "live", None)
        if isinstance(live, dict):  # nothing of the model is read after close
            live.pop("forget_bias", None)
        warn_if_no_step(self._monitor, self._mode)
        if not self._suspended:
            self._leave()
        self._handles.remove()

    def suspend(self) -> None:
        """Leave the model and optimizer as they were but keep the graph state (variables,
        ring, the steps already traced with gradwatch's ops), so :meth:`resume` needs no
        retrace. Between the two, an already traced step's gradwatch ops stand aside
        (``active`` is False: no clipping, no skipping) and the policy state is the host's.
        The caller syncs first (pending rows stay in the ring otherwise)."""
        if self._closed or self._suspended:
            return
        self._leave()
        self._handles.remove()
        self._held_state = self.state_dict()  # nothing changes it until resume: read once
        self._suspended = True

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
            self._graph.active.assign(np.asarray(True))
            if self._graph.policy is not None:
                self._monitor.decide_on_device(self._graph.policy)

    @property
    def model(self) -> Any:
        """The watched model (None once it no longer exists)."""
        return self._model_ref()
