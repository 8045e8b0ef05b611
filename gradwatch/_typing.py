"""``WatchOptions``: every keyword ``watch()``, ``Monitor`` and the callbacks accept, as a
``TypedDict``, so an IDE completes the option names and a type checker flags a typo
(``watch(model, opt, log_evry=10)``) before the run starts. The values are still
validated at construction (:class:`gradwatch.options.Options`): this only types them.

Kept beside :class:`~gradwatch.options.Options` by a test (the same names, no more, no
fewer). Each option's meaning is in ``Options`` and in docs/reference.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypedDict

__all__ = ["WatchOptions"]


class WatchOptions(TypedDict, total=False):
    """The options of ``gradwatch.watch(model, optimizer=None, **options)`` (all optional)."""

    policy: str | Any | None  # "fixed" | "autoclip" | "zclip" | "agc" | a policy object | None
    max_norm: float
    on_nonfinite: Literal["warn", "skip", "raise"]
    log_every: int
    profile_every: int
    sinks: Sequence[str | Any]  # "logging", "memory", "jsonl:PATH", "tensorboard:DIR", or sink objects
    keep: int
    all_ranks: bool
    vanish_ratio: float
    explode_ratio: float
    spike_z: float
    spike_ratio: float
    spike_warmup: int
    spike_alpha: float
    norm_ceiling: float | None
    jump_ratio: float
    vanish_floor: float
    vanish_patience: int
    alert_every: int
    replay_every: int | None
    run_name: str | None
