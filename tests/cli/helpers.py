"""Helpers for the command-line tests: run files made with the core, and running the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from gradwatch import StepStats

ROOT = Path(__file__).resolve().parents[2]


def make_run(
    path: Path, steps: int = 60, *, nan_at: tuple[int, ...] = (), policy: str | None = None, run_name: str | None = None
) -> Path:
    """A run file from the core alone (numpy): decaying sensitivity and propagation profiles,
    optional NaN steps."""
    import gradwatch

    rng = np.random.default_rng(0)
    options = {"sinks": [f"jsonl:{path}"], "log_every": 5, "profile_every": 5, "policy": policy, "run_name": run_name}
    mon = gradwatch.Monitor(**{k: v for k, v in options.items() if v is not None or k == "policy"})
    mon.bind(["rnn.weight_hh_l0", "rnn.weight_ih_l0", "head.weight"])
    for step in range(1, steps + 1):
        sq = rng.lognormal(0.0, 0.3, size=3) ** 2
        if step in nan_at:
            sq[0] = math.nan
        temporal = spectral = propagation = None
        if mon.profile_due():
            gain = 0.8 + 0.15 * step / steps  # the profile improves as "training" goes on
            temporal = {"rnn": gain ** np.arange(50)[::-1]}
            propagation = {"rnn": {"l0": gain ** np.arange(50)}}
            spectral = {"rnn.weight_hh_l0": 0.9 + 0.002 * step}
        mon.process(StepStats(sq, temporal=temporal or {}, propagation=propagation or {}, spectral=spectral or {}))
    mon.close()
    return path


def gradwatch_cmd(
    *args: str, cwd: Path | None = None, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m gradwatch ARGS`` in a fresh interpreter (so a traceback would be visible)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
