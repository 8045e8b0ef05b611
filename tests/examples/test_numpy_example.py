"""examples/numpy_manual.py runs, and its hand-written BPTT shows the tanh RNN vanishing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_numpy_manual_example_runs_and_reports_vanishing():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "numpy_manual.py"), "--steps", "60", "--seq", "60"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Vanishing gradient through time in recurrent layer 'rnn'" in out.stderr
    assert "events: ['vanishing']" in out.stdout
