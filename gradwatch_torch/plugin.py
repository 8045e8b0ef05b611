"""gradwatch's PyTorch backend plugin (entry point ``gradwatch = torch:gradwatch_torch.plugin``).

Importing this module never imports torch: pluggy loads every backend's plugin at the
first ``gradwatch.watch()``, and a user of Keras alone must not pay torch's 2 s import.
The target is recognised through ``sys.modules`` (if torch was never imported, the
object cannot be a torch module).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from gradwatch.hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch.view import MonitorPort
    from gradwatch_torch.attach import TorchAttachment

__all__ = ["gradwatch_attach"]


@hookimpl
def gradwatch_attach(target: object, optimizer: object | None, monitor: MonitorPort) -> TorchAttachment | None:
    """Attach to ``target`` if it is a ``torch.nn.Module`` (DDP and compiled ones included).

    Returns None for anything else, so another backend may try.
    """
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(target, torch.nn.Module):
        return None
    from gradwatch_torch.attach import attach  # torch is already imported by the caller

    return attach(target, optimizer, monitor)
