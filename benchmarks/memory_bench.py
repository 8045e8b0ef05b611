"""Memory: peak resident memory of 5,000 watched steps against 500.

Each run is a fresh subprocess (``--child``) that trains a small LSTM for N steps and
reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. Target: the 5,000-step peak exceeds
the 500-step peak by under 5%. The unwatched loop is measured the same way, as the
reference for what torch itself grows by.

``python -m benchmarks.memory_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import emit, logger

log = logger("memory")

TARGET_GROWTH = 0.05


def child(steps: int, arm: str) -> None:
    sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]
    sys.modules.setdefault("keras", None)  # type: ignore[arg-type]
    import torch
    from torch import nn

    import gradwatch

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = None
    if arm == "watched":
        watch = gradwatch.watch(model, opt)  # defaults: logging sink, keep=1000, profile_every=10
    elif arm == "watched zclip profile_every=1":
        watch = gradwatch.watch(model, opt, policy="zclip", profile_every=1)
    x = torch.randn(8, 20, 8)
    y = torch.randint(0, 4, (8,))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    n_records = len(watch.records) if watch is not None else 0
    if watch is not None:
        watch.close()
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "records": n_records}))


def measure(steps: int, arm: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_bench", "--child", str(steps), "--arm", arm],
        capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--child", type=int)
    p.add_argument("--arm", default="watched")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.child is not None:
        child(a.child, a.arm)
        return
    short, long = (20, 40) if a.quick else (500, 5000)
    repeats = 1 if a.quick else a.repeats
    arms = ("watched",) if a.quick else ("unwatched", "watched", "watched zclip profile_every=1")
    t0 = time.perf_counter()
    rows = []
    for arm in arms:
        peaks = {}
        for steps in (short, long):
            runs = [measure(steps, arm) for _ in range(repeats)]
            peaks[steps] = statistics.median(r["maxrss_kb"] for r in runs)
            log(f"{arm}: {steps} steps, peak RSS {peaks[steps] / 1024:.1f} MiB")
        growth = peaks[long] / peaks[short] - 1
        rows.append({
            "arm": arm,
            "short": short,
            "long": long,
            "short_mib": peaks[short] / 1024,
            "long_mib": peaks[long] / 1024,
            "growth": growth,
            "target": None if arm == "unwatched" else TARGET_GROWTH,
            "met": None if arm == "unwatched" else growth < TARGET_GROWTH,
        })
    emit(a.json, {"bench": "memory", "repeats": repeats, "seconds": time.perf_counter() - t0, "rows": rows})


if __name__ == "__main__":
    main()
