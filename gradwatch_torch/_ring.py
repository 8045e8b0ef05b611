"""Quiet steps' statistics kept on the device, and the copy that brings them to the host.

A *quiet* step (neither profiled nor flushed, ``on_nonfinite="warn"``) reads nothing back
to the host: its row (the norms and, with a policy, the device's clip decision) stays on
the device in :class:`DeviceRing` and is recorded at the next read with its own step
number (issue 20). The rows are bounded (:data:`MAX_PENDING`); one more quiet step is a
read step. A read brings every pending row to the host in one copy, oldest first, and
hands each to the monitor; the events they raise go out then, at most ``profile_every``
steps after the step that raised them. A read *step* (profiled, flushed) makes that same
one copy carry its own row too (:meth:`DeviceRing.read`): one transfer per read step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradwatch import Layout, Segment

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from gradwatch import MonitorPort, StepStats

__all__ = ["MAX_PENDING", "DeviceRing"]

#: Quiet steps kept on the device at most; one more is a read step (profile_every=0 with
#: a large log_every would otherwise keep them all).
MAX_PENDING = 256


class DeviceRing:
    """The pending rows (``rows``: layout, row on the device, presence mask), the layouts
    they and the read steps use, and the one copy of a read.

    ``fail(what, exc)`` is told of a failure (gradwatch then stops on this model); the
    rows are dropped either way.
    """

    def __init__(self, monitor: MonitorPort, fail: Callable[[str, BaseException], None]) -> None:
        self.rows: list[tuple[Layout, Tensor, Any]] = []
        #: The name that labels the clip decisions (a policy run on the device), or None.
        self.policy_name: str | None = None
        self._monitor = monitor
        self._fail = fail
        self._layouts: dict[tuple[Segment, ...], Layout] = {}
        self._quiet_layouts: dict[tuple[int, bool], Layout] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) >= MAX_PENDING

    def layout(self, segments: list[Segment]) -> Layout:
        """The layout of ``segments`` (built once per distinct list)."""
        key = tuple(segments)
        got = self._layouts.get(key)
        if got is None:
            got = self._layouts[key] = Layout(segments)
        return got

    def forget_layouts(self) -> None:
        """The parameter set changed: the layouts of the old one are not used again."""
        self._layouts.clear()

    def keep(self, norms: Tensor, clip: tuple[Tensor, Tensor] | None, present: Any) -> None:
        """Keep a quiet step's row: its norms and, with a policy, (threshold, scale)."""
        n = int(norms.shape[0])
        layout = self._quiet_layouts.get((n, clip is not None))
        if layout is None:
            segments = [Segment("norms", n)] + ([Segment("clip", 2)] if clip is not None else [])
            layout = self._quiet_layouts[(n, clip is not None)] = Layout(segments)
        parts = [norms.to(torch.float64)]
        if clip is not None:
            parts += [clip[0].reshape(1), clip[1].reshape(1)]
        self.rows.append((layout, torch.cat(parts), present))

    def drop(self) -> None:
        self.rows.clear()

    def flush(self) -> None:
        """Record the pending rows, oldest first, from one copy. Each keeps its own step
        number; the events they raise go out now."""
        if self.rows:
            self._take([], "copying the quiet steps' statistics to the host")

    def read(self, layout: Layout, row: Tensor, present: Any) -> StepStats | None:
        """A read step's statistics (its ``row`` packed in ``layout``), the pending rows
        recorded first, all brought to the host in one copy. None if that failed (``fail``
        was told)."""
        host = self._take([row], "copying the step's statistics to the host")
        if host is None:
            return None
        try:
            stats = layout.unpack(host, self.policy_name)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._fail("copying the step's statistics to the host", exc)
            return None
        return stats if present is None else dataclasses.replace(stats, present=present)

    def _take(self, extra: list[Tensor], what: str) -> np.ndarray | None:
        """One device-to-host copy of the pending rows and ``extra``; the pending rows are
        recorded, what is left of the copy (``extra``'s values) is returned."""
        pending = list(self.rows)
        self.rows.clear()
        try:
            rows = [r for _, r, _ in pending] + extra
            if len(rows) > 1:  # float64: the pending rows are; float32 values widen exactly
                flat = torch.cat([r.reshape(-1).to(torch.float64) for r in rows])
            else:
                flat = rows[0].reshape(-1)
            host = flat.numpy(force=True)  # the one transfer (force: from any device)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._fail(what, exc)
            return None
        start = 0
        for layout, _, present in pending:
            try:
                stats = layout.unpack(host[start : start + layout.width], self.policy_name)
                start += layout.width
                if present is not None:
                    stats = dataclasses.replace(stats, present=present)
                self._monitor.process(stats)
            except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
                self._fail("recording a quiet step", exc)
                return None
        return host[start:]
