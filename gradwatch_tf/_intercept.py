"""The restorable wrap of ``optimizer.apply``, and what else a Keras model caches.

Keras' ``apply_gradients`` calls ``optimizer.apply``; gradwatch replaces ``apply`` *on the
instance* (never on the class), so restoring is deleting that attribute, and the
optimizer is then exactly the object it was. Traced step functions cached by Keras keep
whatever they were traced with: :class:`FitFunctions` keeps the ones traced during a
watched ``fit`` apart from the user's (swapped in at train begin, out at train end), so
a later watched ``fit`` of the same compiled model reuses its trace and an unwatched one
never runs gradwatch's ops; :func:`drop_traced_functions` forgets them for a custom loop.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from gradwatch.errors import GradwatchError

__all__ = ["FitFunctions", "FitSignature", "drop_traced_functions", "unwrap_optimizer", "wrap_apply", "xla_context"]

#: The step functions Keras caches on a model (``make_*_function``), traced lazily.
FUNCTIONS = ("train_function", "test_function", "predict_function")

logger = logging.getLogger("gradwatch")

#: Optimizers currently wrapped (weak: a watch never keeps an optimizer alive).
_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()


def unwrap_optimizer(opt: Any) -> Any:
    """The optimizer whose ``apply`` receives unscaled gradients.

    ``LossScaleOptimizer`` divides by the loss scale and then calls its inner optimizer's
    ``apply``: wrapping the inner one measures true gradients (and is not reached on
    overflow steps, which the loss scaler skips anyway).
    """
    inner = getattr(opt, "inner_optimizer", None)
    if inner is not None and type(opt).__name__ == "LossScaleOptimizer":
        return inner
    return opt


def wrap_apply(
    opt: Any,
    model_name: str,
    step: Callable[[Any, Any, Callable[..., Any]], Any],
    heal: Callable[[], bool] | None = None,
) -> tuple[Callable[..., Any], Callable[[], None]]:
    """Replace ``opt.apply`` by ``step(grads, variables, original_apply)``.

    Returns the original bound ``apply`` and the function that restores it. Refuses an
    optimizer gradwatch (or another wrapper of ``apply``) already holds, unless that
    wrapper is a stale one (a ``fit`` that ended where no hook could see it): it is
    removed first.
    """
    existing = vars(opt).get("apply")
    heal = getattr(existing, "__gradwatch_heal__", None)
    if heal is not None:
        heal()
    if opt in _WATCHED or "apply" in vars(opt):
        raise GradwatchError(
            f"The optimizer {type(opt).__name__!r} of model {model_name!r} is already watched (by gradwatch or by "
            "another wrapper of optimizer.apply); close the other watch first."
        )
    original = opt.apply  # the bound class method

    def apply(grads: Any, trainable_variables: Any = None) -> Any:
        return step(grads, trainable_variables, original)

    apply.__doc__ = original.__doc__
    apply.__gradwatch__ = True  # type: ignore[attr-defined]
    if heal is not None:
        apply.__gradwatch_heal__ = heal  # type: ignore[attr-defined]
    object.__setattr__(opt, "apply", apply)
    _WATCHED.add(opt)

    def restore() -> None:
        if vars(opt).get("apply") is apply:
            object.__delattr__(opt, "apply")
        _WATCHED.discard(opt)

    return original, restore


def xla_context() -> bool:
    """True while tracing inside ``jit_compile=True`` (no host callbacks there)."""
    try:
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - private API; assume XLA, the safe answer
        return True


def drop_traced_functions(model: Any) -> None:
    """Forget Keras' cached traced step functions.

    A cached ``train_function`` traced with gradwatch's wrapper keeps its ops; restoring
    the Python attributes does not change a graph already traced, so the next ``fit``
    must retrace without them. Keras rebuilds these lazily (as after ``compile``).
    """
    for attr in FUNCTIONS:
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except Exception as exc:  # noqa: BLE001 - a read-only attribute: leave it
                logger.debug("gradwatch: could not drop %s: %r", attr, exc)


class FitSignature:
    """What a traced train step depends on: the model, its optimizer, its compilation
    (``compile`` makes a new ``_compile_config`` each time), ``steps_per_execution``,
    ``jit_compile``, ``run_eagerly``, the distribution strategy and the trainable
    variables. Two fits with equal signatures can share one trace.

    Objects are compared by identity and held strongly (an ``id`` could be reused by a
    later object once the first is freed); the callback drops its signature at ``close``.
    """

    __slots__ = ("_objects", "_values")

    def __init__(self, model: Any) -> None:
        opt = getattr(model, "optimizer", None)
        self._objects: tuple[Any, ...] = (
            model,
            opt,
            unwrap_optimizer(opt) if opt is not None else None,
            getattr(model, "_compile_config", None),
            getattr(model, "distribute_strategy", None),
            *list(getattr(model, "trainable_variables", ())),
        )
        self._values = (
            int(getattr(model, "steps_per_execution", 1) or 1),
            bool(getattr(model, "jit_compile", False)),
            bool(getattr(model, "run_eagerly", False)),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FitSignature):
            return NotImplemented
        return (
            self._values == other._values
            and len(self._objects) == len(other._objects)
            and all(a is b for a, b in zip(self._objects, other._objects))
        )

    __hash__ = None  # type: ignore[assignment]


_MISSING = object()


class FitFunctions:
    """Keras' step functions traced during watched fits, kept apart from the user's.

    ``enter`` (train begin) remembers the model's functions and puts gradwatch's in their
    place: the ones kept from an earlier fit, or else a fresh train function (the one Keras
    cached may have been traced without the wrapper). ``leave`` (train end) keeps whatever
    the fit traced and gives the model back exactly the functions it had, so nothing of
    gradwatch runs in a later unwatched ``fit``, ``evaluate`` or ``predict``.
    """

    def __init__(self, model: Any) -> None:
        self._model_ref = weakref.ref(model)
        self._ours: dict[str, Any] = {}
        self._users: dict[str, Any] | None = None
        self._lean: Any = None  # the lean train function (see lean_function), kept like _ours
        #: Seconds of the first call of the full train function (its trace, and one step):
        #: what tracing the lean one is reckoned to cost (it traces less: an upper bound).
        self.trace_cost: float | None = None
        #: Seconds reckoned lost so far by running the full function where the lean one would
        #: do (``LEAN_SAVING`` of each such call's time).
        self.forgone = 0.0
        self.lean_ran = False  # the lean function has run once (its trace succeeded)
        #: JAX: when the last full call of this fit started (its dispatch returns before the
        #: step has run; the interval is the step's time). None at each fit's start.
        self.last_start: float | None = None
        self.lean_broken = False  # its trace failed: the full function runs every step

    @property
    def entered(self) -> bool:
        return self._users is not None

    def enter(self, guard: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Swap gradwatch's functions in; ``guard`` wraps the train function (the
        callback's way to see an exception that ends ``fit``)."""
        model = self._model_ref()
        if model is None or self._users is not None:
            return
        self.last_start = None
        self._users = {a: getattr(model, a, None) for a in FUNCTIONS}
        for a, fn in self._ours.items():
            setattr(model, a, fn)
        if "train_function" not in self._ours:
            try:
                model.train_function = None
                model.make_train_function()  # untraced: traced at the first batch, with the wrapper
            except BaseException:
                model.train_function = self._users["train_function"]
                raise
        model.train_function = guard(model.train_function)

    def leave(self) -> None:
        """Keep what the fit traced; give the model back its own functions."""
        model, users, self._users = self._model_ref(), self._users, None
        if model is None or users is None:
            return
        for a in FUNCTIONS:
            current = getattr(model, a, None)
            if current is users[a]:
                continue
            if current is not None:
                self._ours[a] = getattr(current, "__gradwatch_guarded__", current)
            try:
                setattr(model, a, users[a])
            except Exception as exc:  # noqa: BLE001 - a read-only attribute: leave it
                logger.debug("gradwatch: could not restore %s: %r", a, exc)

    def lean_worth_it(self) -> bool:
        """Trace the lean function once the time it would have saved has paid for its
        trace (the rent-or-buy rule: never more than twice the better choice's cost in
        hindsight). A short fit, where a second trace would cost more than it saves, keeps
        the one full function; a long one switches after a number of steps that is a few
        times the first call over the step time."""
        if self.lean_broken:
            return False
        return self._lean is not None or (self.trace_cost is not None and self.forgone >= self.trace_cost)

    def lean_function(self) -> Any:
        """A second train function of the model, made by Keras like the first and traced
        at its first call: the callback runs it, with the attachment's ``lean`` switch on
        while it traces, for executions without a profiled step. Made once and kept with
        the others; the model's own ``train_function`` is left as it was."""
        model = self._model_ref()
        if self._lean is None and model is not None:
            current = model.train_function
            own = model.__dict__.get("train_step", _MISSING)
            try:
                import keras

                if keras.backend.backend() == "jax":
                    # Keras jits the bound method ``model.train_step``, and jax.jit caches
                    # traces by function: the lean function would reuse the full trace.
                    # A function of its own gets a trace of its own.
                    step = model.train_step

                    def lean_step(state: Any, data: Any) -> Any:
                        return step(state, data)

                    object.__setattr__(model, "train_step", lean_step)
                model.train_function = None
                model.make_train_function()
                self._lean = model.train_function
            finally:
                if own is _MISSING:
                    model.__dict__.pop("train_step", None)
                else:
                    object.__setattr__(model, "train_step", own)
                model.train_function = current
        return self._lean

    def forget(self) -> None:
        """Drop the kept traces (and with them gradwatch's graph state)."""
        self._ours.clear()
        self._lean, self.trace_cost, self.forgone = None, None, 0.0
        self.lean_ran = self.lean_broken = False
