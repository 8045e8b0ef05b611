"""``GradWatchCallback``: gradwatch for ``model.fit``, a thin adapter over ``gradwatch.Watch``.

Keras' ``fit`` owns the training loop, so there is no place for a hook around
``optimizer.apply`` other than the optimizer itself: at train begin the callback gives
its :class:`~gradwatch.Watch` a :class:`~gradwatch_tf.attach.TFAttachment` (which wraps
``apply`` on the optimizer instance); the gradients are measured and clipped inside the
traced step, and the callback reads the per-step ring buffer at the end of the batches
that need the host (flush and profiled steps: ``read_due``).

Why a second ``fit`` costs no retrace: at train end the attachment is *suspended*, not
closed. The optimizer and the layers get their own methods back, the model gets back the
step functions it had before the fit (so an unwatched ``fit``, ``evaluate`` or
``predict`` runs none of gradwatch's ops), and the callback keeps the functions traced
during the fit together with gradwatch's variables. The next ``fit`` of the same model,
optimizer and compilation swaps them in again; any change (another model or optimizer,
``compile`` again, ``steps_per_execution``, ``jit_compile``, the trainable variables)
starts afresh, with a retrace, as Keras itself would.

The run file is complete at the end of every ``fit``: the last partial window reaches the
sinks at train end, and also when ``fit`` stops with an exception (raised in the train
step, Ctrl-C included, or ``on_nonfinite="raise"``). Records, events and state live in the
watch across fits; ``close()`` is needed only to close the sinks for good.

Every way out of ``fit`` restores the model and the optimizer, although Keras' ``fit``
has no ``try/finally`` around its loop: the exits that can raise are guarded while the fit
runs (the fit's ``CallbackList`` methods, the epoch iterator's ``catch_stop_iteration``,
the train function, the validation ``evaluate``), and whatever slips past them is caught
by the wrappers themselves: each one (``optimizer.apply``, the train function, the
recurrent layers' ``call``) knows the fit it was installed for (``model.history``, a new
``History`` at every ``fit``) and, run outside it, restores everything, flushes the sinks
and delegates to the original. So a later unwatched ``fit`` runs none of gradwatch's ops.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import keras

from gradwatch import Monitor, Watch
from gradwatch.errors import NonFiniteGradientError
from gradwatch.records import StepRecord
from gradwatch.watch import WatchFront
from gradwatch_tf._intercept import FitFunctions, FitSignature
from gradwatch_tf._ring import RingReader

logger = logging.getLogger("gradwatch")

__all__ = ["GradWatchCallback"]

#: The share of a full TensorFlow step the lean train function is reckoned to save where
#: a recurrent layer is watched: the sensitivity probe's input gradient and the profile's
#: conditionals, measured at 0.15-0.25 of a small LSTM model's step
#: (``benchmarks/keras_bench.py --backend-ratios``). It only paces the switch.
LEAN_SAVING = 0.15
#: The least share counted on JAX, where the lean function leaves out the sensitivity
#: probe's dL/dx of a recurrent layer that reads data (computed on every step of the full
#: function: a jitted backward cannot branch on the step number). The share itself comes
#: from the layers' shapes (:meth:`gradwatch_tf.portable.PortableAttachment.lean_saving`,
#: F / (3 (F + units)) per direction): 0.07 for LSTM(64) over 16 features, where 0.03-0.06
#: of the step was measured, 0.27 over 256 features, where 0.33 was.
LEAN_SAVING_JAX = 0.02


def _execution_error(exc: BaseException) -> bool:
    """An error raised while a traced function ran (TensorFlow's ``OpError``: the end of
    the data, a failed check in the user's model), not while it was traced."""
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf

    return isinstance(exc, tf.errors.OpError)


def _end_of_data() -> tuple[type[BaseException], ...]:
    """Exceptions that end an epoch inside ``fit`` (caught by Keras' epoch iterator), not fit."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return (StopIteration, tf.errors.OutOfRangeError)
    return (StopIteration,)


#: The Keras backends that dispatch batch-end callbacks asynchronously (Keras'
#: ``IS_THREAD_SAFE``; TensorFlow's calls them in the loop).
_ASYNC_BACKENDS = ("jax", "torch")


def _keras_default_batch_end(batch: int, logs: Mapping[str, Any] | None = None) -> None:
    """A batch end that does nothing, marked as Keras marks its own default methods
    (``keras.src.utils.python_utils.default``), so Keras still dispatches the batch-end
    callbacks of a JAX or torch fit asynchronously (see :meth:`GradWatchCallback._read_after`)."""


_keras_default_batch_end._is_default = True  # type: ignore[attr-defined]


def _tell_steps_left(att: Any, steps_left: int | None) -> None:
    """Tell the host profile (TensorFlow's, JAX's through-time sites) how many steps this
    fit has left: a short fit compiles no replay (:data:`gradwatch_tf._kkept.BACKGROUND_MIN_STEPS`)."""
    for profile in (getattr(att, "_host", None), getattr(att, "_tt", None)):
        if profile is not None and hasattr(profile, "steps_left"):
            profile.steps_left = steps_left


def _warm_up(att: Any) -> None:
    """Start the background trace of TensorFlow's host replay for a long fit (a no-op
    otherwise: :meth:`gradwatch_tf._tfhost.HostProfile.warm_up`)."""
    host = getattr(att, "_host", None)
    if host is not None:
        try:
            host.warm_up()
        except Exception as exc:  # noqa: BLE001 - profiling is optional; the host compiles later
            logger.debug("gradwatch: could not start the profile's trace: %r", exc)


def _build_optimizer(model: Any) -> None:
    """TensorFlow: build the optimizer now, eagerly, with the model's trainable variables,
    as Keras' default train step would in its first trace. Keras on TensorFlow (without
    a distribution strategy, which builds it before the fit) creates the optimizer's
    variables inside the first trace of the train step, and a ``tf.function`` that
    created variables is traced a second time: the whole step, gradwatch's share included
    (a third to a half of a small model's first ``fit``). Built before, it is traced once. The
    same variables with the same initial values: training is bitwise unchanged. Only
    for the default train step (a custom one may apply the optimizer to fewer variables)
    and a model whose layers are all built."""
    if keras.backend.backend() != "tensorflow":
        return
    opt = getattr(model, "optimizer", None)
    if opt is None or getattr(opt, "built", True) or type(model).train_step is not keras.Model.train_step:
        return
    try:
        if not all(layer.built for layer in model._flatten_layers()):
            return
        with model.distribute_strategy.scope():
            opt.build(model.trainable_variables)
    except Exception as exc:  # noqa: BLE001 - Keras builds it in the trace as usual
        logger.debug("gradwatch: could not build the optimizer before the fit: %r", exc)


def _attachment(model: Any, monitor: Any, capacity: int) -> RingReader:
    """The backend's attachment: the TensorFlow step (through-time included) on
    TensorFlow, the ``keras.ops`` step (:mod:`gradwatch_tf.portable`) on JAX and torch."""
    if keras.backend.backend() == "tensorflow":
        from gradwatch_tf.attach import TFAttachment

        return TFAttachment(model, None, monitor, mode="callback", capacity=capacity)
    from gradwatch_tf.portable import PortableAttachment

    return PortableAttachment(model, None, monitor, mode="callback", capacity=capacity)


#: The fit's ``CallbackList`` methods guarded while a watched fit runs: an exception out
#: of any of them leaves ``fit`` (Keras catches none).
_GUARDED_CALLBACK_METHODS = (
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
)


def _wrong_trainer(trainer: str, right: str) -> str:
    module = right.rsplit(".", 1)[0]
    return (
        f"gradwatch_tf.GradWatchCallback is the Keras callback (for model.fit) and cannot run in {trainer}; "
        f"use {right} there (`from {module} import GradWatchCallback`), with the same options."
    )


def _set_instance_attr(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Put ``value`` on the instance (bypassing Keras' attribute tracking); the undo
    deletes it again if it is still ours."""
    object.__setattr__(obj, name, value)

    def undo() -> None:
        if obj.__dict__.get(name) is value:
            object.__delattr__(obj, name)

    return undo


class GradWatchCallback(WatchFront, keras.callbacks.Callback):
    """Watch the gradients of ``model.fit`` (options as in ``gradwatch.watch``).

    The options are validated here (a bad one raises ``gradwatch.ConfigError`` before
    training starts). ``logs["grad_norm"]`` (and ``logs["clip_threshold"]`` with a
    policy) is set at the end of each batch whose step gradwatch read (profiled and flush
    steps), so it shows in the progress bar and in ``History``; at epoch end the last
    step's values are reported. ``records``,
    ``events``, ``state_dict()``, ``load_state_dict()`` and ``close()`` are the watch's.

    Pass the same callback to every ``fit`` of a run: steps count on, and later fits of
    the same compiled model reuse the first one's trace. At the end of each ``fit`` the
    optimizer and the model are as they were and every sink has every step; ``close()``
    (optional) closes the sinks, e.g. to finish the run file with its summary line.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.watch = Watch(Monitor(**options))
        self._last: StepRecord | None = None
        #: Suspended between two fits (owned by the watch during a fit).
        self._kept: Any = None
        self._signature: FitSignature | None = None
        self._functions: FitFunctions | None = None
        self._in_fit = False
        #: The fit being watched: its ``History`` (``model.history``), weakly.
        self._fit_token: Callable[[], Any] | None = None
        #: Undo functions of the guards put on the fit's objects (callback list, ...).
        self._fit_guards: list[Callable[[], None]] = []
        self._epoch = 0  # the fit's current epoch (Keras' index)
        self._batch = 0  # the first batch of the execution under way (Keras' index)
        if keras.backend.backend() in _ASYNC_BACKENDS:
            # Keras dispatches the batch-end callbacks of a JAX or torch fit in a thread, so
            # that the loop queues the next step while the last one runs, unless one of them
            # overrides on_train_batch_end: that alone, doing nothing, costs 5% of a small
            # LSTM's step on JAX here (the logs are read to the host after every step; on a
            # GPU torch's likewise). gradwatch reads right after the train function instead
            # (:meth:`_read_after`), on flush and profiled steps only, and leaves Keras'
            # dispatch as it is.
            self.on_train_batch_end = _keras_default_batch_end  # type: ignore[method-assign]

    # ------------------------------------------------------------------ fit hooks
    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._in_fit:  # the previous fit stopped where no hook of ours could see it
            self._end_fit()
        model = self.model
        signature = FitSignature(model)
        att = self._kept
        if att is not None and (signature != self._signature or att.model is not model):
            self._forget()
            att = None
        self._kept, self._signature = None, signature
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        total = steps * epochs if isinstance(steps, int) and isinstance(epochs, int) else None
        if att is None:
            _build_optimizer(model)
            capacity = int(getattr(model, "steps_per_execution", 1) or 1)
            att = _attachment(model, self.monitor, capacity)
            self._functions = FitFunctions(model)
            self.watch.attach(att)
        else:
            self.watch.attach(att)  # hands it the watch's backend state (a no-op if unchanged)
            try:
                att.resume()
            except BaseException:  # e.g. the optimizer is now held by another watch
                self.watch.release()
                self._kept = att  # still suspended: kept for a later fit, closed by close()
                raise
        self._in_fit = True
        _tell_steps_left(att, total)
        _warm_up(att)  # a long fit's replay traced in the background from now
        enter = getattr(att, "enter_optimizer", None)
        if enter is not None:  # JAX: gradwatch's state travels with the optimizer's
            enter()
        history = getattr(model, "history", None)
        self._fit_token = weakref.ref(history) if history is not None else None
        att.outside_fit = self._outside_fit
        assert self._functions is not None
        try:
            self._functions.enter(self._guard)
        except Exception as exc:  # noqa: BLE001 - Keras makes the function lazily anyway
            logger.error("gradwatch: could not prepare Keras' train function: %r", exc)
        try:
            self._guard_fit(sys._getframe(1), model)
        except Exception as exc:  # noqa: BLE001 - the wrappers heal themselves anyway
            logger.debug("gradwatch: could not guard the fit loop: %r", exc)

    def on_train_batch_begin(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._batch = int(batch)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = int(epoch)
        if self._functions is not None:  # (JAX: no step interval across an epoch's end)
            self._functions.last_start = None

    def _steps_left(self, batch: int) -> int | None:
        """The steps this fit has left after batch ``batch`` of the current epoch (None:
        unknown, e.g. a dataset without a length)."""
        params = self.params or {}
        steps, epochs = params.get("steps"), params.get("epochs")
        if not isinstance(steps, int) or not isinstance(epochs, int):
            return None
        return max((epochs - self._epoch - 1) * steps + (steps - int(batch) - 1), 0)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        """TensorFlow (Keras calls its batch ends in the loop): read the ring when due. On
        JAX and torch this method is replaced by a default one and :meth:`_read_after`
        reads instead."""
        att = self.watch.attachment
        if not isinstance(att, RingReader):
            return
        due = getattr(att, "read_due", None)  # a host read on flush and profiled steps only
        # ``self._model``, not ``self.model``: on JAX Keras' property syncs the whole model
        # state to its variables (about 0.5 ms a batch here, and the next step re-gathers it).
        if due is not None and not due(int(getattr(self._model, "steps_per_execution", 1) or 1)):
            return  # nothing read: this batch's logs get no grad_norm rather than an older step's
        self._read_now(att, batch, logs)

    def _read_now(self, att: RingReader, last_batch: int, logs: dict[str, Any] | None) -> None:
        """Read the ring (``last_batch``: the execution's last batch, for the steps the fit
        has left) and put the last read step's ``grad_norm`` into ``logs``, the logs of the
        batch that step ended; a non-finite gradient under "raise" ends the fit here."""
        _tell_steps_left(att, self._steps_left(last_batch))
        try:
            records = att.sync_records()
        except NonFiniteGradientError:
            self._end_fit()
            raise
        if records:
            self._last = records[-1]
            self._fill_logs(logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        att = self.watch.attachment
        if getattr(att, "read_due", None) is not None:  # the epoch's last step, for History
            try:
                records = att.sync_records()  # type: ignore[union-attr]
            except NonFiniteGradientError:
                self._end_fit()
                raise
            self._last = records[-1] if records else self._last
        self._fill_logs(logs)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._end_fit()

    def _guard(self, train_function: Callable[..., Any]) -> Callable[..., Any]:
        """``train_function`` that ends the fit properly (sinks flushed, optimizer
        restored) when an exception leaves it: Keras calls no ``on_train_end`` then.
        Called in a later fit (this one ended unseen), it heals and runs the user's."""

        end_of_data = _end_of_data()

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self._outside_fit():
                model = self._model_of_functions()
                fn = getattr(model, "train_function", None)
                if fn is None or fn is guarded:
                    model.train_function = None
                    model.make_train_function()
                    fn = model.train_function
                return fn(*args, **kwargs)
            try:
                return self._run(train_function, args, kwargs)
            except end_of_data:
                raise
            except BaseException:
                self._end_fit()
                raise

        guarded.__gradwatch_guarded__ = train_function  # type: ignore[attr-defined]
        return guarded

    def _run(self, train_function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One Keras execution (:meth:`_execute`), then on JAX and torch the host's read of
        its steps when one is due (:meth:`_read_after`)."""
        out = self._execute(train_function, args, kwargs)
        if keras.backend.backend() in _ASYNC_BACKENDS:
            self._read_after(out)
        return out

    def _read_after(self, out: Any) -> None:
        """JAX and torch: what :meth:`on_train_batch_end` does on TensorFlow, right after
        the train function returned (JAX: ``(logs, state)``, torch: ``logs``): on a flush
        or profiled step, read the ring (on JAX from the returned state: Keras keeps it in
        ``model._jax_state`` only after this call, so it is put there first, as Keras then
        does) and put ``grad_norm`` into the logs Keras hands to every callback; on other
        steps nothing, no host transfer."""
        att = self.watch.attachment
        if not isinstance(att, RingReader):
            return
        spe = int(getattr(self._model, "steps_per_execution", 1) or 1)
        due = getattr(att, "read_due", None)
        if due is None or not due(spe):
            return
        logs, state = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        model = self._model
        if isinstance(state, (tuple, list)) and len(state) == 4:
            trainable, non_trainable, optimizer_variables, metrics = state
            model._jax_state = {
                "trainable_variables": trainable,
                "non_trainable_variables": non_trainable,
                "optimizer_variables": optimizer_variables,
                "metrics_variables": metrics,
            }
        self._read_now(att, self._batch + spe - 1, logs if isinstance(logs, dict) else None)

    def _execute(self, train_function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One Keras execution: the full train function, or the lean one when none of its
        steps is profiled (:meth:`gradwatch_tf.attach.TFAttachment.lean_due`, on JAX
        :meth:`gradwatch_tf.portable.PortableAttachment.lean_due`)
        and a second trace is worth it (:meth:`gradwatch_tf._intercept.FitFunctions.lean_worth_it`)."""
        att = self.watch.attachment
        due = getattr(att, "lean_due", None)
        functions = self._functions
        if due is None or functions is None:
            return train_function(*args, **kwargs)
        lean = None
        try:
            if due(int(getattr(self._model, "steps_per_execution", 1) or 1)):
                lean = functions.lean_function() if functions.lean_worth_it() else False
        except Exception as exc:  # noqa: BLE001 - the full function measures the same steps
            logger.debug("gradwatch: no lean train function: %r", exc)
        if lean:
            att.lean = True  # read while Keras traces it (its first call)
            try:
                out = lean(*args, **kwargs)
                functions.lean_ran = True
                return out
            except Exception as exc:
                if functions.lean_ran or _execution_error(exc) or isinstance(exc, _end_of_data()):
                    raise  # the step's own error (or the end of the data), as the full function's
                # Its trace failed (nothing ran yet): this fit's full function runs every step.
                logger.warning(
                    "gradwatch: the lean train function could not be traced (%r); the full one runs every step.", exc
                )
                functions.lean_broken = True
            finally:
                att.lean = False
        start = time.perf_counter()
        out = train_function(*args, **kwargs)
        spent = time.perf_counter() - start
        on_jax = keras.backend.backend() == "jax"
        if on_jax:
            # JAX returns at dispatch, before the step has run: the time since the previous
            # full call of this fit is the step's (the first call's compile is synchronous)
            previous, functions.last_start = functions.last_start, start
            spent = spent if functions.trace_cost is None else (start - previous if previous is not None else 0.0)
        if functions.trace_cost is None:
            functions.trace_cost = spent
        elif lean is False:  # a lean call would have done: count what it would have saved
            saving = max(LEAN_SAVING_JAX, float(att.lean_saving())) if on_jax else LEAN_SAVING
            functions.forgone += saving * spent
        return out

    # ------------------------------------------------------------------ every way out
    def _guard_fit(self, frame: Any, model: Any) -> None:
        """Guard what can raise out of this ``fit`` (Keras has no try/finally there):
        the ``CallbackList`` calling us (``frame`` is its ``on_train_begin``), the epoch
        iterator's ``catch_stop_iteration`` and the validation ``evaluate`` (both found
        in ``fit``'s own frame). An exception through any of them ends our fit at once
        (sinks flushed, everything restored) and goes on."""
        from keras.callbacks import CallbackList

        def ending(method: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(*args: Any, **kwargs: Any) -> Any:
                try:
                    return method(*args, **kwargs)
                except BaseException:
                    self._end_fit()
                    raise

            return guarded

        callbacks = frame.f_locals.get("self") if frame is not None else None
        if isinstance(callbacks, CallbackList):
            for name in _GUARDED_CALLBACK_METHODS:
                if name not in vars(callbacks):
                    self._fit_guards.append(_set_instance_attr(callbacks, name, ending(getattr(callbacks, name))))
        fit_frame = frame
        for _ in range(8):  # CallbackList.on_train_begin <- fit (a few frames at most)
            if fit_frame is None or fit_frame.f_locals.get("self") is model:
                break
            fit_frame = fit_frame.f_back
        if fit_frame is None or fit_frame.f_locals.get("self") is not model:
            return
        iterator = fit_frame.f_locals.get("epoch_iterator")
        catch = getattr(iterator, "catch_stop_iteration", None)
        if catch is not None and "catch_stop_iteration" not in vars(iterator):

            @contextlib.contextmanager
            def catch_stop_iteration() -> Any:
                try:
                    with catch():  # ends the epoch on StopIteration / OutOfRange, as before
                        yield
                except BaseException:
                    self._end_fit()
                    raise

            self._fit_guards.append(_set_instance_attr(iterator, "catch_stop_iteration", catch_stop_iteration))
        fit_code = fit_frame.f_code
        evaluate = model.evaluate
        if "evaluate" not in vars(model):

            def guarded_evaluate(*args: Any, **kwargs: Any) -> Any:
                caller = sys._getframe(1)
                if caller.f_code is not fit_code:  # the user's own evaluate: not ours
                    return evaluate(*args, **kwargs)
                try:
                    return evaluate(*args, **kwargs)
                except BaseException:
                    self._end_fit()
                    raise

            self._fit_guards.append(_set_instance_attr(model, "evaluate", guarded_evaluate))

    def _outside_fit(self) -> bool:
        """True when the fit we were installed for is over although no hook said so (an
        exception left it unseen) and a wrapper of ours runs again, in a later fit or
        loop: everything is restored and flushed now, and the caller delegates."""
        if not self._in_fit:
            return False
        att = self.watch.attachment
        model = att.model if isinstance(att, RingReader) else None
        token = self._fit_token
        if model is None or token is None or getattr(model, "history", None) is token():
            return False
        logger.info(
            "gradwatch: the previous watched fit ended without reaching on_train_end; restored the model and optimizer."
        )
        try:
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                with tf.init_scope():  # we may be inside a trace of the later fit
                    self._end_fit()
            else:
                self._end_fit()
        except Exception as exc:  # noqa: BLE001 - never break the user's later fit
            logger.error("gradwatch: restoring after an interrupted fit failed: %r", exc)
        return True

    def _model_of_functions(self) -> Any:
        functions = self._functions
        return functions._model_ref() if functions is not None else None

    def _end_fit(self) -> None:
        """Read what is pending, flush the partial window to the sinks, give the model
        and optimizer back, keep the graph state for the next fit. Idempotent."""
        if not self._in_fit:
            return
        self._in_fit = False
        self._fit_token = None
        guards, self._fit_guards = self._fit_guards, []
        for undo in reversed(guards):
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - best effort, the rest must still run
                logger.debug("gradwatch: could not remove a fit guard: %r", exc)
        att = self.watch.attachment
        if isinstance(att, RingReader):
            att.outside_fit = None
        try:
            if isinstance(att, RingReader):
                try:
                    att.sync()
                except NonFiniteGradientError:
                    pass  # already raised once (its event is emitted); the fit is over
        finally:
            try:
                if self._functions is not None:
                    self._functions.leave()
            finally:
                if isinstance(att, RingReader):
                    att.suspend()
                released = self.watch.release()  # the watch keeps the backend state
                if isinstance(released, RingReader):
                    self._kept = released
                elif released is not None:
                    released.close()
                self.monitor.flush()

    def _forget(self) -> None:
        """Drop the kept attachment and traces (another model, optimizer or compilation)."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.close()
        if self._functions is not None:
            self._functions.forget()
        self._functions = None
        self._signature = None

    def _fill_logs(self, logs: dict[str, Any] | None) -> None:
        if logs is None or self._last is None:
            return
        logs["grad_norm"] = self._last.global_norm
        if self._last.clip is not None:
            logs["clip_threshold"] = self._last.clip.threshold

    # ------------------------------------------- in another framework's trainer
    #: What a Lightning ``Trainer`` or a Hugging Face ``Trainer`` touches first on a
    #: callback: the Keras callback says at once which class belongs there.
    @property
    def state_key(self) -> str:  # Lightning: read when the Trainer checks its callbacks
        raise TypeError(_wrong_trainer("a Lightning Trainer", "gradwatch_torch.lightning.GradWatchCallback"))

    def setup(self, *args: Any, **kwargs: Any) -> None:  # Lightning: the first hook of a fit
        raise TypeError(_wrong_trainer("a Lightning Trainer", "gradwatch_torch.lightning.GradWatchCallback"))

    def on_init_end(self, *args: Any, **kwargs: Any) -> None:  # Hugging Face Trainer.__init__
        raise TypeError(_wrong_trainer("a Hugging Face Trainer", "gradwatch_torch.transformers.GradWatchCallback"))

    # ------------------------------------------------------------------ like a Watch
    def close(self) -> None:
        """Remove everything of gradwatch now (also in the middle of a ``fit``) and close
        the monitor's sinks (the run file gets its summary line). Idempotent."""
        try:
            self._end_fit()
        finally:
            try:
                self.watch.close()
            finally:
                self._forget()
