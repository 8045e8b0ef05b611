"""Read a gradwatch run file (the "jsonl:PATH" sink) and print what happened.

    python examples/read_run.py gradwatch-demo/rnn_tanh.jsonl

Run files are plain JSON lines, so any tool can read them; gradwatch.read_run gives
back the same StepRecord and GradEvent objects the training process had.
"""

from __future__ import annotations

import sys
from collections import Counter

import gradwatch


def main(path: str) -> None:
    run = gradwatch.read_run(path)  # raises gradwatch.RunFileError for a bad file
    print(f"{run.name}: backend {run.header.get('backend', '?')}, {len(run.records)} records, {len(run.events)} events")

    # Records are written every `log_every` steps; each summarises its window of steps.
    for rec in run.records[:: max(1, len(run.records) // 5)]:
        w = rec.window
        line = f"  step {rec.step:>5}: grad norm {rec.global_norm:.3g}"
        if w is not None:
            line += f" (window of {w.steps}: min {w.norm_min:.3g}, max {w.norm_max:.3g}, clipped {w.clipped})"
        print(line)

    # Per-timestep profiles: how much gradient reaches each input timestep of a recurrent layer.
    for layer in {name for rec in run.records for name in rec.temporal}:
        last = [rec for rec in run.records if layer in rec.temporal][-1]
        prof = last.temporal[layer]
        state = "vanishing" if prof.earliest_over_peak < 1e-3 else "reaches the first timestep"
        print(f"  {layer}: gain {prof.gain:.3f} per timestep, horizon {prof.horizon}/{prof.length} -> {state}")

    # Events: alerts as they happened (rate-limited repeats are counted in `suppressed`).
    counts = Counter(e.kind for e in run.events)
    print("  events:", dict(counts) or "none")
    for event in run.events[:3]:
        print(f"    step {event.step}: {event.message}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/read_run.py RUN.jsonl")
    main(sys.argv[1])
