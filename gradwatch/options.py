"""The options every ``watch()``, ``Monitor`` and ``GradWatchCallback`` accepts.

Validated once, at construction, so a typo fails before training starts rather than
hours into it. Every error names the option, the value received and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from gradwatch.errors import ConfigError

__all__ = ["ON_NONFINITE", "Options", "profile_due", "profiled_ordinal"]

ON_NONFINITE = ("warn", "skip", "raise")
_UNSET: Any = object()


def profile_due(step: Any, every: int, ops: Any = None) -> Any:
    """The one profiling rule: is optimizer step ``step`` (from 1) a profiled step?

    The first step (so a short run gets a profile), then every ``every`` steps; never
    when ``every`` is 0. With ``ops`` (an :class:`~gradwatch.arrayops.ArrayOps`) ``step``
    may be a device scalar and the answer is one too: the in-graph schedule is this rule.
    """
    if every <= 0:
        return False if ops is None else ops.asarray(False, "bool")
    if ops is None:
        return step == 1 or step % every == 0
    return ops.logical_or(ops.equal(step, 1), ops.equal(step % every, 0))


def profiled_ordinal(step: Any, every: int) -> Any:
    """k for the k-th profiled step (from 0) under :func:`profile_due`: step 1 is the
    first, then every ``every``-th step (a Python int or a device scalar alike)."""
    return step - 1 if every <= 1 else step // every


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(option: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(f"gradwatch option {option}={value!r} is not allowed: expected {allowed}.", option=option, value=value)


@dataclass(frozen=True)
class Options:
    """Every option, with its documented default (README, "Options").

    ``policy`` .. ``keep`` are the options of docs/API.md. The rest tune the detectors; their
    defaults were chosen to stay silent on healthy training (no exploding alert on 10,000
    steps of log-normal norms with sigma 0.3) and to flag a 10x spike at once.
    """

    #: None (observe only, training bitwise unchanged), a registry name or a policy object.
    policy: Any = None
    #: Threshold of "fixed"; for "zclip" a cap, applied only when given explicitly.
    max_norm: float = 1.0
    #: "warn" | "skip" | "raise": what a NaN/Inf gradient does to the step.
    on_nonfinite: str = "warn"
    #: Steps between flushes of (window-summarised) records to the sinks.
    log_every: int = 50
    #: Steps between per-timestep profiles and spectral norms of recurrent layers; 0 = off.
    profile_every: int = 10
    #: Where records and events go: "logging", "memory", "jsonl:PATH", "tensorboard:DIR", objects.
    sinks: Sequence[Any] = ("logging",)
    #: Records and events kept in memory (``watch.records`` / ``watch.events``).
    keep: int = 1000
    #: In distributed training, let every rank write to its sinks (default: rank 0 only).
    all_ranks: bool = False
    #: Through time: a recurrence's horizon ends where its propagation gain falls below
    #: this; the layer is *vanishing* when that horizon is shorter than the sequence.
    vanish_ratio: float = 1e-3
    #: Through time: *exploding* when a recurrence's propagation gain exceeds this.
    explode_ratio: float = 1e3
    #: Global-norm spike: z-score of log(norm) against its running statistics ...
    spike_z: float = 6.0
    #: ... and the norm must also exceed this multiple of the running geometric mean.
    spike_ratio: float = 10.0
    #: Steps of statistics gathered before spikes are judged.
    spike_warmup: int = 20
    #: Decay of the running log-norm statistics (closer to 1: longer memory).
    spike_alpha: float = 0.98
    #: A global norm this many times the largest norm of all previous steps is *exploding*
    #: at any step, warm-up included (a jump of orders of magnitude: 1e8x at step 3).
    jump_ratio: float = 1e4
    #: An absolute ceiling on the global norm (None: none); any norm above is "exploding".
    norm_ceiling: float | None = None
    #: Global / per-layer norm counted as vanished below this value (0 disables) ...
    vanish_floor: float = 1e-10
    #: ... for this many consecutive steps.
    vanish_patience: int = 20
    #: Minimum steps between two alerts of the same kind for the same layer (0: no limit).
    alert_every: int = 100
    #: Through time: measure propagation on every n-th profiled step (1: every one); None
    #: lets the cost model decide (a replay adds at most 5% to the profiled steps' time).
    replay_every: int | None = None
    #: A name for the run, written into the JSONL header and used by the report.
    run_name: str | None = None
    #: Whether max_norm was given explicitly (set by from_kwargs; caps adaptive policies).
    max_norm_given: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not (_is_number(self.max_norm) and math.isfinite(self.max_norm) and self.max_norm > 0):
            raise _bad("max_norm", self.max_norm, "a finite number > 0")
        if self.on_nonfinite not in ON_NONFINITE:
            raise _bad("on_nonfinite", self.on_nonfinite, "one of 'warn', 'skip', 'raise'")
        for name, lo in (("log_every", 1), ("profile_every", 0), ("keep", 1), ("spike_warmup", 1),
                         ("vanish_patience", 1), ("alert_every", 0)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise _bad(name, v, f"an integer >= {lo}")
        if isinstance(self.sinks, (str, bytes)) or not isinstance(self.sinks, Sequence):
            raise _bad("sinks", self.sinks, 'a list such as ["logging", "jsonl:run.jsonl"]')
        if not isinstance(self.all_ranks, bool):
            raise _bad("all_ranks", self.all_ranks, "True or False")
        for name in ("vanish_ratio",):
            v = getattr(self, name)
            if not (_is_number(v) and 0 < v < 1):
                raise _bad(name, v, "a number in (0, 1)")
        if not (_is_number(self.spike_alpha) and 0 < self.spike_alpha < 1):
            raise _bad("spike_alpha", self.spike_alpha, "a number in (0, 1)")
        for name in ("explode_ratio", "spike_ratio", "jump_ratio"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v > 1):
                raise _bad(name, v, "a finite number > 1")
        if not (_is_number(self.spike_z) and math.isfinite(self.spike_z) and self.spike_z > 0):
            raise _bad("spike_z", self.spike_z, "a finite number > 0")
        if self.norm_ceiling is not None and not (_is_number(self.norm_ceiling) and self.norm_ceiling > 0):
            raise _bad("norm_ceiling", self.norm_ceiling, "None or a number > 0")
        if not (_is_number(self.vanish_floor) and math.isfinite(self.vanish_floor) and self.vanish_floor >= 0):
            raise _bad("vanish_floor", self.vanish_floor, "a finite number >= 0")
        if self.replay_every is not None and not (isinstance(self.replay_every, int) and not isinstance(self.replay_every, bool) and self.replay_every >= 1):
            raise _bad("replay_every", self.replay_every, "None (the cost model decides) or an integer >= 1")
        if self.run_name is not None and not isinstance(self.run_name, str):
            raise _bad("run_name", self.run_name, "None or a string")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Options:
        """Build from user keywords, naming any unknown keyword and the known ones."""
        known = {f.name for f in fields(cls) if f.name != "max_norm_given"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            policy_hint = _policy_hint(unknown[0], kwargs[unknown[0]])
            close = [k for k in sorted(known) if _similar(unknown[0], k)]
            hint = policy_hint or (f" Did you mean {close[0]!r}?" if close else "")
            raise ConfigError(
                f"Unknown gradwatch option {unknown[0]!r}.{hint} Known options: {', '.join(sorted(known))}.",
                option=unknown[0],
                value=kwargs[unknown[0]],
            )
        if "sinks" in kwargs and kwargs["sinks"] is not None and not isinstance(kwargs["sinks"], (str, bytes)):
            if isinstance(kwargs["sinks"], Sequence):
                kwargs["sinks"] = tuple(kwargs["sinks"])
        return cls(**kwargs, max_norm_given="max_norm" in kwargs)

    def public(self) -> dict[str, Any]:
        """The options as plain values (for the JSONL header and logs)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "max_norm_given":
                continue
            v = getattr(self, f.name)
            if f.name == "policy" and v is not None and not isinstance(v, str):
                v = repr(v)
            elif f.name == "sinks":
                v = [s if isinstance(s, str) else type(s).__name__ for s in v]
            out[f.name] = v
        return out


#: Keywords of the policy constructors (docs/API.md, "Policies"): passed to ``watch()``
#: they belong in the policy object instead.
POLICY_KEYWORDS = {
    "percentile": "AutoClip",
    "history": "AutoClip",
    "alpha": "ZClip",
    "z_threshold": "ZClip",
    "warmup": "ZClip",
    "clip_factor": "AGC",
    "eps": "AGC",
}


def _policy_hint(option: str, value: object) -> str:
    """The hint for a policy constructor's keyword given to ``watch()`` (else empty):
    name the policy and write the call that works, e.g. ``policy=gradwatch.AutoClip(percentile=5)``."""
    cls = POLICY_KEYWORDS.get(option)
    if cls is None:
        return ""
    return (
        f" {option!r} is an argument of the {cls} policy, not of watch(): pass "
        f"policy=gradwatch.{cls}({option}={value!r})."
    )


def _similar(a: str, b: str) -> bool:
    a, b = a.lower(), b.lower()
    if a in b or b in a:
        return True
    common = sum(1 for x, y in zip(a, b) if x == y)
    return common >= max(3, int(0.6 * max(len(a), len(b))))
