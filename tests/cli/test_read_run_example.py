"""examples/read_run.py runs on a real run file and prints its story."""

from __future__ import annotations

import subprocess
import sys

from tests.cli.helpers import ROOT, make_run


def test_read_run_example_prints_records_profile_and_events(tmp_path):
    run = make_run(tmp_path / "run.jsonl", nan_at=(7,), run_name="example")
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "read_run.py"), str(run)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("example: backend ?")
    assert "step     5: grad norm" in res.stdout
    assert "rnn: gain" in res.stdout and "horizon" in res.stdout
    assert "nonfinite" in res.stdout
