"""Where gradwatch's time goes in a PyTorch step (cProfile on workload W1).

For each watched configuration: warm up, then profile N whole training steps and keep
what gradwatch's own code costs per step: the cumulative time of its entry points (the
optimizer pre-hook, the recurrent probes' hooks) and the heaviest lines of its work —
gradwatch functions' own time plus the time of each framework/builtin call they make,
attributed to the calling gradwatch function. cProfile inflates Python-heavy code, so
the shares are upper bounds; the unwatched step time is measured without the profiler.

``python -m benchmarks.profile_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import sys

for _name in ("tensorflow", "keras"):
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]

import argparse
import copy
import cProfile
import os
import pstats
import statistics
import time
from typing import Any

import torch

from benchmarks.harness import emit, logger
from benchmarks.torch_bench import workload

log = logger("profile")

OURS = ("gradwatch" + os.sep, "gradwatch_torch" + os.sep)
CONFIGS = {
    "defaults": {},
    "zclip": {"policy": "zclip"},
    "profile_every=1": {"profile_every": 1},
}
ENTRY = (
    "_optimizer_hook",
    "_measure",
    "process",
    "pre_hook",
    "forward_hook",
    "_on_grad",
)


def ours(func: tuple[str, int, str]) -> bool:
    path = func[0]
    return any(f"{os.sep}{o}" in path for o in OURS) and "benchmarks" not in path


def label(func: tuple[str, int, str]) -> str:
    path, line, name = func
    if path == "~" or path.startswith("<"):
        return name.strip("<>")
    parts = path.split(os.sep)
    return f"{'/'.join(parts[-2:])}:{name}"


def profile(config: dict[str, Any], base: torch.nn.Module, data: list, loss_of: Any, steps: int, warm: int
            ) -> dict[str, Any]:
    import gradwatch

    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gradwatch.watch(model, opt, **config)

    def step(i: int) -> None:
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()

    for i in range(warm):
        step(i)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for i in range(steps):
        step(warm + i)
    prof.disable()
    wall = (time.perf_counter() - t0) / steps
    watch.close()
    st = pstats.Stats(prof)
    raw = st.stats  # type: ignore[attr-defined]
    entries = {}
    for func, (_cc, nc, tt, ct, _callers) in raw.items():
        if ours(func) and func[2] in ENTRY:
            key = label(func)
            entries[key] = entries.get(key, 0.0) + ct / steps
    costs: dict[str, float] = {}
    for func, (_cc, nc, tt, ct, callers) in raw.items():
        if ours(func):
            costs[label(func) + " (own Python)"] = costs.get(label(func) + " (own Python)", 0.0) + tt / steps
            continue
        for caller, (_c, _n, ctt, cct) in callers.items():
            if ours(caller):
                key = f"{label(caller)} -> {label(func)}"
                costs[key] = costs.get(key, 0.0) + cct / steps
    return {"wall_step_profiled": wall, "entries": entries, "costs": costs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workload", default="W1", choices=("W1", "W2"))
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    a = p.parse_args(argv)
    base, data, loss_of, desc = workload(a.workload, a.quick)
    steps, warm = (10, 2) if a.quick else (a.steps, 10)

    # Unwatched step time without the profiler, for the shares.
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for i in range(warm + steps):
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    unwatched = statistics.median(times[warm:])
    results = {}
    for name in a.configs.split(","):
        cfg = CONFIGS[name]
        log(f"profiling {name}: {steps} steps")
        results[name] = profile(cfg, base, data, loss_of, steps, warm)

    md = [
        f"cProfile over {steps} steps of {a.workload} ({desc}) per configuration, after {warm} warm-up steps. "
        f"Costs are ms per step (averaged over profiled and unprofiled steps) and % of an unwatched "
        f"step ({1000 * unwatched:.0f} ms here, timed without the profiler). cProfile adds its own "
        "overhead to every Python call, so these are upper bounds.",
        "",
    ]
    for name, r in results.items():
        md += [f"**{name}** — entry points (cumulative):", ""]
        for k, v in sorted(r["entries"].items(), key=lambda kv: -kv[1]):
            md.append(f"- `{k}`: {1000 * v:.2f} ms/step ({100 * v / unwatched:.2f}%)")
        md += ["", "heaviest costs (own Python time, or time of the call made from gradwatch code):", ""]
        md += ["| where | ms/step | % of step |", "| --- | ---: | ---: |"]
        for k, v in sorted(r["costs"].items(), key=lambda kv: -kv[1])[:12]:
            md.append(f"| `{k}` | {1000 * v:.3f} | {100 * v / unwatched:.2f}% |")
        md.append("")
    emit(a.json, {"bench": "profile", "unwatched_s": unwatched, "results": results, "markdown": "\n".join(md)})


if __name__ == "__main__":
    main()
