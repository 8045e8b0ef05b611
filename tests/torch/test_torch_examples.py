"""examples/torch_loop.py and examples/ddp_torch.py run, at small sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch examples need torch")

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def test_torch_loop_example_runs_and_writes_a_run_file(tmp_path):
    proc = _run("torch_loop.py", "--steps", "20", "--seq-len", "12", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "steps: 20" in proc.stdout and "horizon" in proc.stdout
    lines = (tmp_path / "run.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["type"] == "header"
    assert any(json.loads(line)["type"] == "record" for line in lines[1:])


def test_ddp_example_ranks_agree_and_only_rank0_writes(tmp_path):
    proc = _run("ddp_torch.py", "--steps", "6", "--out", str(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ranks agree: True" in proc.stdout
    assert "profiled steps 0" not in proc.stdout
    assert (tmp_path / "rank0.jsonl").exists()
    assert not (tmp_path / "rank1.jsonl").exists()
    header = json.loads((tmp_path / "rank0.jsonl").read_text().splitlines()[0])
    assert header["world_size"] == 2
