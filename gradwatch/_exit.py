"""Closing what the user did not close: watches and monitors still open at exit.

A script that ends without ``watch.close()`` (it forgot, or its training loop raised and
nothing caught it) would otherwise leave the last partial window of records in memory,
and the run file without its last steps. Every :class:`~gradwatch.Watch` and
:class:`~gradwatch.Monitor` registers here; at interpreter exit the ones still open are
closed, which flushes their partial windows, writes the summary line and closes the
sinks. Watches close first: a watch brings statistics still pending on the device to the
host before its monitor closes.

Bounded: the registry holds weak references only, so it never keeps a model, a watch or
a monitor alive. Process-safe: each object is closed only by the process that created
it, never by a forked child (a DataLoader worker, say) that inherited a copy, since that
copy would write the parent's window a second time.

``atexit`` does not run in ``multiprocessing`` children (``torch.multiprocessing.spawn``
ranks among them: they end with ``os._exit``); in such a child the same closing is
registered with ``multiprocessing.util.Finalize``, which their exit does run. A process
killed by a signal it does not handle (SIGKILL; SIGTERM's default action) runs neither:
see the README ("Records, events, state") for the one-line SIGTERM recipe.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import weakref
from typing import Any, Protocol

__all__ = ["close_all", "track", "untrack"]

logger = logging.getLogger("gradwatch")


class _Closeable(Protocol):
    def close(self) -> None: ...


#: object -> (order, pid of the process that created it). Order 0 (watches) closes first.
_live: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()
_mp_registered_in: int | None = None


def track(obj: _Closeable, order: int = 1) -> None:
    """Close ``obj`` at exit if it is still open then (weakly held)."""
    _live[obj] = (order, os.getpid())
    _register_multiprocessing_exit()


def untrack(obj: _Closeable) -> None:
    """``obj`` closed itself: nothing left to do at exit."""
    try:
        del _live[obj]
    except (KeyError, TypeError):
        pass


def close_all() -> None:
    """Close every tracked object this process created (watches first). Never raises."""
    pid = os.getpid()
    try:
        items = sorted(((order, i, obj) for i, (obj, (order, owner)) in enumerate(list(_live.items())) if owner == pid), key=lambda t: t[:2])
    except Exception:  # noqa: BLE001 - at exit, nothing may raise
        return
    for _, _, obj in items:
        try:
            obj.close()
        except Exception as exc:  # noqa: BLE001 - one failure must not stop the others
            try:
                logger.error("closing %s at exit failed: %s: %s", type(obj).__name__, type(exc).__name__, exc)
            except Exception:  # noqa: BLE001, S110 - logging may be gone at exit
                pass
        untrack(obj)


atexit.register(close_all)


def _register_multiprocessing_exit() -> None:
    """In a multiprocessing child, close at its exit too (it skips ``atexit``)."""
    global _mp_registered_in
    pid = os.getpid()
    if _mp_registered_in == pid:
        return
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return
    try:
        if mp.parent_process() is None:
            return
        from multiprocessing import util

        util.Finalize(None, close_all, exitpriority=100)
    except Exception:  # noqa: BLE001 - best effort: atexit still covers ordinary exits
        return
    _mp_registered_in = pid
