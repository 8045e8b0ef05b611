"""``gradwatch report`` on very wide and very large run files (issue 15): linear in the
number of layers, at most MAX_LAYERS rows drawn (said so), files beyond what a report
reads refused in one line."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest

from gradwatch import StepStats

pytest.importorskip("matplotlib")


def _wide_run(path: Path, layers: int, steps: int = 20) -> Path:
    import gradwatch

    mon = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=5, profile_every=0, run_name="wide")
    mon.bind([f"block{i}.weight" for i in range(layers)])
    rng = np.random.default_rng(0)
    for _ in range(steps):
        mon.process(StepStats(rng.lognormal(0.0, 0.3, size=layers) ** 2))
    mon.close()
    return path


def test_heatmap_of_20000_layers_is_fast_and_says_it_shows_the_largest(tmp_path: Path) -> None:
    from gradwatch.cli import plot_norms
    from gradwatch.cli.report import load_runs

    run_file = _wide_run(tmp_path / "wide.jsonl", 20_000)
    (run,), _ = load_runs([run_file])
    start = time.perf_counter()
    got = plot_norms.plot_layer_heatmap(run, "wide", tmp_path / "layers.png")
    seconds = time.perf_counter() - start
    assert got is not None
    assert seconds < 5.0, f"heatmap of 20,000 layers took {seconds:.1f}s"
    assert f"the {plot_norms.MAX_LAYERS} layers with the largest norms of 20000" in got[2]


def test_layer_matrix_keeps_the_largest_in_model_order() -> None:
    from gradwatch.cli.plot_norms import _layer_matrix
    from gradwatch.records import StepRecord

    norms = {f"l{i}": float(i % 7) for i in range(100)}
    norms["l3"] = float("nan")
    recs = [StepRecord(step=s, global_norm=1.0, layer_norms=norms) for s in (1, 2)]
    names, data, total = _layer_matrix(recs, 10)
    assert total == 100
    assert len(names) == 10 and data.shape == (10, 2)
    assert all(norms[n] == 6.0 for n in names)  # the largest ...
    assert names == sorted(names, key=lambda n: int(n[1:]))  # ... in model order


def test_report_refuses_a_file_beyond_what_it_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradwatch.cli import summary
    from gradwatch.cli.report import run_report

    run_file = _wide_run(tmp_path / "wide.jsonl", 50)
    monkeypatch.setattr(summary, "MAX_REPORT_BYTES", 1000)
    out, err = io.StringIO(), io.StringIO()
    assert run_report([str(run_file)], str(tmp_path / "r"), out, err) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "more than a report reads" in lines[0] and "read_jsonl" in lines[0]
    assert not (tmp_path / "r" / "report.html").exists()
