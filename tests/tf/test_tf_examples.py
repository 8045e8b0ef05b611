"""The two Keras examples run as users run them (subprocess, small sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="the Keras backend needs TensorFlow")
pytest.importorskip("keras", reason="the Keras backend needs Keras 3")

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str]) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, *args], check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_keras_fit_example_runs(tmp_path):
    out = _run(["examples/keras_fit.py", "--epochs", "1", "--samples", "128", "--out", str(tmp_path)])
    assert "steps: 4" in out and "horizon" in out
    lines = (tmp_path / "keras_fit.jsonl").read_text().splitlines()
    assert '"header"' in lines[0] and len(lines) >= 2


def test_keras_custom_loop_example_runs():
    out = _run(["examples/keras_custom_loop.py", "--steps", "20"])
    assert "steps: 20" in out and "optimizer restored: True" in out
