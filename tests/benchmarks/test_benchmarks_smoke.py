"""The benchmarks run (tiny sizes, one short round each) and produce a table.

Nothing about time is asserted: benchmarks are not tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_benchmark_runs_once_and_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--rounds", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## PyTorch", "## Keras 3", "## Memory", "## Import", "## Hot path"):
        assert heading in text, heading
    assert "FAILED" not in text
    assert "| arm | median | min | max |" in text
    for arm in ("unwatched", "gradwatch defaults", "gradwatch zclip", "gradwatch profile_every=1",
                "clip_grad_norm_", "GradWatchCallback defaults", "global_clipnorm"):
        assert f"| {arm} |" in text, arm
    assert "python -m benchmarks --quick" in text
