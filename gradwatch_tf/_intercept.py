"""The restorable wrap of ``optimizer.apply``, and what else a Keras model caches.

Keras' ``apply_gradients`` calls ``optimizer.apply``; gradwatch replaces ``apply`` *on the
instance* (never on the class), so restoring is deleting that attribute, and the
optimizer is then exactly the object it was. Traced step functions cached by Keras keep
whatever they were traced with, so they are dropped when gradwatch leaves for good.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from gradwatch.errors import GradwatchError

__all__ = ["drop_traced_functions", "unwrap_optimizer", "wrap_apply", "xla_context"]

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


def wrap_apply(opt: Any, model_name: str, step: Callable[[Any, Any, Callable[..., Any]], Any]) -> tuple[Callable[..., Any], Callable[[], None]]:
    """Replace ``opt.apply`` by ``step(grads, variables, original_apply)``.

    Returns the original bound ``apply`` and the function that restores it. Refuses an
    optimizer gradwatch (or another wrapper of ``apply``) already holds.
    """
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
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except Exception as exc:  # noqa: BLE001 - a read-only attribute: leave it
                logger.debug("gradwatch: could not drop %s: %r", attr, exc)
