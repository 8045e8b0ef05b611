"""benchmarks/gpu.py runs on the CPU as a smoke test (tiny sizes) and prints its table.

Nothing about time is asserted: benchmarks are not tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="benchmarks/gpu.py needs torch")

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_runs_on_the_cpu_and_prints_one_table() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--quick", "--rounds", "1", "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in ("W1", "W2", "many"):
        for arm in ("unwatched", "floor: one flat norm", "clip_grad_norm_", "gradwatch defaults", "gradwatch zclip",
                    "gradwatch profile_every=1"):
            assert f"| {model} | {arm} |" in proc.stdout, (model, arm)
    assert "SYNC" not in proc.stdout
