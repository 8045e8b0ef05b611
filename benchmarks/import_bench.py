"""Import: ``import gradwatch`` in a fresh interpreter, median of several runs.

Target: under 100 ms, and no framework (torch, tensorflow, keras, jax) in
``sys.modules`` afterwards. numpy and pluggy are gradwatch's dependencies and count.
The interpreter's own start-up is not counted (timed inside the child).

``python -m benchmarks.import_bench [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchmarks.harness import emit

TARGET_S = 0.100
FRAMEWORKS = ("torch", "tensorflow", "keras", "jax")

POST = """
t = time.perf_counter()
gradwatch.Monitor(sinks=[])
dt_monitor = time.perf_counter() - t
print(json.dumps({"seconds": dt, "monitor_seconds": dt_monitor,
                  "frameworks": [m for m in %r if m in sys.modules],
                  "modules": len(sys.modules)}))
""" % (FRAMEWORKS,)

CHILD = """
import json, sys, time
t = time.perf_counter()
import gradwatch
dt = time.perf_counter() - t
""" + POST

# The same with numpy imported first: gradwatch's own share (and pluggy's).
CHILD_OWN = """
import json, sys, time
import numpy
t = time.perf_counter()
import gradwatch
dt = time.perf_counter() - t
""" + POST


def breakdown(top: int = 8) -> str:
    """Largest top-level imports under ``import gradwatch`` by cumulative time (one run)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gradwatch"],
                         capture_output=True, text=True)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line.split(":", 1)[1].split("|")
        try:
            cumulative = int(parts[1])
        except ValueError:
            continue
        name = parts[2]
        if name.strip() in ("numpy", "pluggy", "importlib.metadata") or name.strip().startswith("gradwatch"):
            rows.append((cumulative, name.strip()))
    rows.sort(reverse=True)
    return ", ".join(f"{n} {us / 1000:.0f} ms" for us, n in rows[:top])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--runs", type=int, default=9)
    a = p.parse_args(argv)
    runs = 1 if a.quick else a.runs
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    numpy_only = []
    for _ in range(runs):
        code = "import time; t = time.perf_counter(); import numpy; print(time.perf_counter() - t)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        numpy_only.append(float(out.stdout.strip().splitlines()[-1]))
    own = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD_OWN], capture_output=True, text=True, check=True)
        own.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    secs = [r["seconds"] for r in results]
    frameworks = sorted({m for r in results for m in r["frameworks"]})
    med = statistics.median(secs)
    emit(a.json, {
        "breakdown": breakdown(),
        "bench": "import",
        "runs": runs,
        "median_s": med,
        "min_s": min(secs),
        "own_median_s": statistics.median(own),
        "numpy_median_s": statistics.median(numpy_only),
        "max_s": max(secs),
        "first_monitor_s": statistics.median(r["monitor_seconds"] for r in results),
        "frameworks": frameworks,
        "modules": results[-1]["modules"],
        "target_s": TARGET_S,
        "met": med < TARGET_S and not frameworks,
    })


if __name__ == "__main__":
    main()
