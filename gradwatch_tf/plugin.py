"""gradwatch's Keras 3 backend plugin (entry point ``tf``), for every Keras backend.

Imported by the plugin manager whether or not Keras is installed, so it imports neither
Keras nor a framework: a target is recognised through ``sys.modules``, and the backend
proper is imported only once a Keras model is actually being watched.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from gradwatch.hookspecs import hookimpl

if TYPE_CHECKING:
    from gradwatch.attachment import Attachment
    from gradwatch.view import MonitorPort


def _is_keras_model(target: object) -> bool:
    keras = sys.modules.get("keras")
    if keras is None:
        return False
    try:
        return isinstance(target, keras.Model)
    except Exception:  # noqa: BLE001 - a half-imported keras is not ours to judge
        return False


def check_optimizer(optimizer: object | None) -> None:
    """Refuse an optimizer that is not a Keras one (a torch optimizer given with a Keras
    model, say) with a ``TypeError`` that says what to pass, before anything is wrapped."""
    if optimizer is None:
        return
    keras = sys.modules.get("keras")
    base = getattr(getattr(keras, "optimizers", None), "Optimizer", None)
    try:
        ok = base is not None and isinstance(optimizer, base)
    except Exception:  # noqa: BLE001 - a half-imported keras: let the attachment judge
        ok = True
    if ok:
        return
    kind = f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"
    hint = ""
    if kind.startswith("torch."):
        hint = (
            " To watch a PyTorch model, pass the torch.nn.Module itself with its torch optimizer: "
            "gradwatch.watch(torch_module, torch_optimizer)."
        )
    raise TypeError(
        f"gradwatch.watch(<Keras model>, optimizer=...) needs a Keras optimizer (keras.optimizers.Optimizer, e.g. "
        f"model.optimizer after compile), or none at all to use model.optimizer; received {kind}.{hint}"
    )


@hookimpl(tryfirst=True)
def gradwatch_attach(target: object, optimizer: object | None, monitor: MonitorPort) -> Attachment | None:
    """Attach to a ``keras.Model`` on any Keras backend; None for anything else.

    Asked before the torch plugin: on the torch backend a ``keras.Model`` is also a
    ``torch.nn.Module``, and it is Keras that trains it (``optimizer.apply``).
    """
    if not _is_keras_model(target):
        return None
    check_optimizer(optimizer)
    return attach_any(target, optimizer, monitor)


def attach_any(target: Any, optimizer: Any, monitor: Any) -> Attachment:
    """The backend's attachment for ``gradwatch.watch``: the TensorFlow step on
    TensorFlow, the ``keras.ops`` step on JAX and torch."""
    keras = sys.modules["keras"]
    if keras.backend.backend() == "tensorflow":
        from gradwatch_tf.attach import attach

        return attach(target, optimizer, monitor)
    from gradwatch_tf.portable import attach as attach_portable

    return attach_portable(target, optimizer, monitor)


__all__: list[Any] = ["gradwatch_attach"]
