"""One writer per run file: claims inside this process, an advisory lock across processes.

Two writers appending to one JSONL file interleave their lines into a file that is no
run at all, so the ``"jsonl:PATH"`` sink refuses to share its path:

* inside one process, each sink *claims* the real path of its file when it is built
  (that is, at ``watch()``), and a second claim on a path whose sink is still open is a
  ``ConfigError`` there and then; the claim is weak (a sink dropped without ``close()``
  gives its path back when it is collected) and released at close;
* across processes, the sink holds ``fcntl.flock(LOCK_EX)`` on the file while it writes
  (released at close, and by the OS when the process ends, however it ends). ``watch()``
  probes that lock, so a second process is refused before training starts; a process
  that loses a race at its first write gets an ERROR line and writes nothing.

The lock is advisory (only gradwatch looks at it) and skipped where the platform or the
file system has none (Windows, some network mounts): then only the in-process check
applies.
"""

from __future__ import annotations

import os
import stat
import weakref
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Claims", "lock", "locked_elsewhere", "repair_tail", "unlock"]


class Claims:
    """Paths claimed by live sinks of this process: real path -> weak reference."""

    def __init__(self) -> None:
        self._by_path: dict[str, weakref.ref[Any]] = {}

    def holder(self, key: str) -> Any | None:
        ref = self._by_path.get(key)
        holder = ref() if ref is not None else None
        if holder is None or getattr(holder, "closed", False):
            return None
        return holder

    def claim(self, key: str, owner: Any) -> None:
        def forget(_: object, key: str = key) -> None:
            if self._by_path.get(key) is ref:
                del self._by_path[key]

        ref = weakref.ref(owner, forget)
        self._by_path[key] = ref

    def release(self, key: str, owner: Any) -> None:
        ref = self._by_path.get(key)
        if ref is not None and ref() is owner:
            del self._by_path[key]


def locked_elsewhere(path: str) -> bool:
    """True if another open file description holds the run file's lock (a live writer in
    another process, or one of this process not known to :class:`Claims`)."""
    if fcntl is None:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False  # no file yet: nobody writes it
    if not stat.S_ISREG(st.st_mode):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no locking on this file system
    finally:
        os.close(fd)  # releases the probe's shared lock
    return False


def lock(fd: int) -> bool:
    """Take the writer's lock on ``fd``; False if another writer holds it. Where locks are
    not supported, True (nothing to take)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def unlock(fd: int) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass


def repair_tail(fd: int, chunk: int = 1 << 16) -> bool:
    """Cut a torn last line (a write the previous writer never finished) off the file
    before appending, so it does not end up in the middle of the file. Returns True when
    something was cut. The caller holds the lock."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return False
    end = size
    while end > 0:
        start = max(0, end - chunk)
        block = os.pread(fd, end - start, start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            os.ftruncate(fd, start + nl + 1)
            return True
        end = start
    os.ftruncate(fd, 0)
    return True
