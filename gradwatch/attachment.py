"""What a backend hands back when it attaches, and a group of removable handles."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gradwatch.records import StepRecord

__all__ = ["Attachment", "HandleGroup"]


@runtime_checkable
class Attachment(Protocol):
    """A backend's live connection to a model (returned by ``gradwatch_attach``).

    ``close`` must remove every hook and wrapper and be safe to call twice; the
    ``Watch`` that owns the attachment calls it.
    """

    backend: str

    def step(self) -> StepRecord | None:
        """Measure now (manual measuring point, e.g. PyTorch without an optimizer)."""
        ...

    def sync(self) -> None:
        """Bring any statistics still pending on the device to the host."""
        ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class HandleGroup:
    """Removes a set of handles (objects with ``.remove()``, or callables) exactly once.

    Every hook a backend installs goes in one group, so ``close()`` cannot forget one;
    removal goes in reverse order of installation, as wrappers must be unwound.
    """

    def __init__(self) -> None:
        self._items: list[Any] = []

    def add(self, handle: Any) -> Any:
        self._items.append(handle)
        return handle

    def add_callback(self, fn: Callable[[], Any]) -> None:
        self._items.append(fn)

    def __len__(self) -> int:
        return len(self._items)

    def remove(self) -> None:
        items, self._items = self._items, []
        errors: list[BaseException] = []
        for h in reversed(items):
            try:
                if callable(getattr(h, "remove", None)):
                    h.remove()
                elif callable(h):
                    h()
            except Exception as exc:  # noqa: BLE001 - remove the rest, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def warn_if_no_step(monitor: Any, mode: str) -> None:
    """At the close of a Keras ``gradwatch.watch`` that never saw an optimizer step, say
    so: a watch that records nothing must not be silent (the torch attachment says the
    same with its own remedy)."""
    if mode == "watch" and monitor.next_step == 1:
        logging.getLogger("gradwatch").warning(
            "gradwatch: this watch was closed after recording 0 steps: no optimizer.apply / apply_gradients "
            "reached it. Pass the optimizer you step with to gradwatch.watch(model, optimizer), or, for "
            "model.fit, use gradwatch_tf.GradWatchCallback."
        )
