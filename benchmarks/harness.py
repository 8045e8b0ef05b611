"""Shared machinery of the benchmarks: interleaved timing, ratios, result tables.

Every benchmark runs all its arms in one process, round after round. In each round every
arm runs the same number of steps, in an order rotated by one arm per round (so no arm is
always first after a pause, or always after the heaviest one). An arm's time in a round is
its mean step time over the round's steps; its ratio for the round is that time divided by
the unwatched arm's time *in the same round*. We report the median ratio over rounds, with
min and max, and the ratio of summed times over all rounds (which counts every rare slow
step: flushes every ``log_every`` steps, profiled steps every ``profile_every``).

The machines here are noisy (2 cores, shared), so only ratios are quoted, never absolute
times. Results travel between processes as JSON (see :func:`emit`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

BASELINE = "unwatched"


@dataclass
class Arm:
    """One way of running the same training step.

    ``run(n)`` runs ``n`` steps and returns their per-step times in seconds (a list of
    ``n`` floats, each timed by the caller with ``time.perf_counter``). ``extra`` may hold
    further per-round measurements (name -> list of per-step seconds), e.g. the time of
    one ``_foreach_norm`` inside the floor arm. ``close`` releases whatever the arm holds.
    """

    name: str
    run: Callable[[int], list[float]]
    close: Callable[[], None] = lambda: None
    target: float | None = None
    note: str = ""
    extra: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class ArmResult:
    name: str
    median: float | None
    min: float | None
    max: float | None
    total: float | None  # sum of the arm's times / sum of the baseline's, over all rounds
    target: float | None = None
    met: bool | None = None
    note: str = ""
    status: str = "ok"  # "ok", "not installed", "failed"


@dataclass
class Workload:
    name: str
    description: str
    rounds: int
    steps_per_round: int
    warmup: int
    arms: list[ArmResult]
    extra: dict[str, Any] = field(default_factory=dict)


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    k = r % len(items)
    return list(items[k:]) + list(items[:k])


def run_interleaved(
    arms: Sequence[Arm],
    *,
    rounds: int,
    steps: int,
    warmup: int,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
    """Warm up each arm, then run ``rounds`` rounds; returns per-round mean step times.

    Also returns, per arm, the per-round means of each of its ``extra`` measurements.
    """
    for arm in arms:
        arm.run(warmup)
        for v in arm.extra.values():
            v.clear()
    times: dict[str, list[float]] = {a.name: [] for a in arms}
    extras: dict[str, dict[str, list[float]]] = {a.name: {k: [] for k in a.extra} for a in arms}
    t0 = time.perf_counter()
    for r in range(rounds):
        for arm in rotated(arms, r):
            per_step = arm.run(steps)
            times[arm.name].append(sum(per_step) / len(per_step))
            for k, v in arm.extra.items():
                if v:
                    extras[arm.name][k].append(sum(v) / len(v))
                v.clear()
        if r == 0 or (r + 1) % max(1, rounds // 5) == 0:
            log(f"  round {r + 1}/{rounds} ({time.perf_counter() - t0:.0f} s)")
    return times, extras


def ratios(times: dict[str, list[float]], name: str, baseline: str = BASELINE) -> list[float]:
    return [a / b for a, b in zip(times[name], times[baseline])]


def summarize(arm: Arm, times: dict[str, list[float]], baseline: str = BASELINE) -> ArmResult:
    rs = ratios(times, arm.name, baseline)
    med = statistics.median(rs)
    total = sum(times[arm.name]) / sum(times[baseline])
    met = None if arm.target is None else med <= arm.target
    return ArmResult(arm.name, med, min(rs), max(rs), total, arm.target, met, arm.note)


def missing(name: str, why: str = "not installed", target: float | None = None) -> ArmResult:
    return ArmResult(name, None, None, None, None, target, None, why, status=why)


# ---------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def versions(*dists: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "not installed"
    return out


def have(dist: str) -> bool:
    from importlib import metadata

    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------------------- JSON


def emit(path: str | None, payload: dict[str, Any]) -> None:
    """Write a benchmark's result (dataclasses become dicts) to ``path`` (or stdout)."""

    def conv(o: Any) -> Any:
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        raise TypeError(type(o))

    text = json.dumps(payload, default=conv, indent=1)
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")


def logger(prefix: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------- markdown


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def workload_table(w: dict[str, Any]) -> str:
    lines = [
        f"#### {w['name']}",
        "",
        w["description"],
        "",
        f"{w['rounds']} rounds x {w['steps_per_round']} steps per arm, "
        f"after {w['warmup']} warm-up steps per arm.",
        "",
        "| arm | median | min | max | sum ratio | target | met? | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | :---: | --- |",
    ]
    for a in w["arms"]:
        target = "" if a["target"] is None else f"≤ {a['target']:.2f}"
        met = "" if a["met"] is None else ("yes" if a["met"] else "**no**")
        if a["status"] != "ok":
            lines.append(f"| {a['name']} | {a['status']} | | | | {target} | | {a['note']} |")
        else:
            lines.append(
                f"| {a['name']} | {fmt_ratio(a['median'])} | {fmt_ratio(a['min'])} | "
                f"{fmt_ratio(a['max'])} | {fmt_ratio(a['total'])} | {target} | {met} | {a['note']} |"
            )
    for k, v in (w.get("extra") or {}).items():
        lines.append("")
        lines.append(f"- {k}: {v}")
    return "\n".join(lines)
