"""examples/lightning_rnn.py and examples/hf_trainer_rnn.py run, at small sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch examples need torch")

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
        env=env,
        cwd=ROOT,
    )


def _records(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "header"
    return [line for line in lines if line["type"] == "record"]


def test_lightning_example_logs_gradwatch_keys_and_writes_a_run_file(tmp_path):
    pytest.importorskip("lightning.pytorch", reason="the Lightning example needs lightning")
    proc = _run("lightning_rnn.py", "--steps", "12", "--seq-len", "8", "--clip-val", "0.5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps: 12" in proc.stdout
    assert "logger keys: gradwatch/clip_scale" in proc.stdout and "gradwatch/grad_norm/lstm" in proc.stdout
    assert "gradient_clip_val=0.5" in proc.stderr  # the one-time warning on policy + Lightning clipping
    assert _records(tmp_path / "run.jsonl")[-1]["step"] == 12  # complete at the end of fit


def test_hf_trainer_example_agrees_with_the_trainers_grad_norm(tmp_path):
    pytest.importorskip("transformers", reason="the Trainer example needs transformers")
    proc = _run("hf_trainer_rnn.py", "--steps", "12", "--seq-len", "8", "--accumulate", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Trainer grad_norm == gradwatch global norm at every logged step: True" in proc.stdout
    assert "gradwatch/grad_norm/gru=" in proc.stdout
    assert "max_grad_norm=1.0" in proc.stderr  # the one-time warning on policy + max_grad_norm
    assert _records(tmp_path / "run.jsonl")[-1]["step"] == 12
