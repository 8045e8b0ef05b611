"""``gradwatch report``: summary, plots and HTML from run files; bad input is exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from gradwatch import StepStats
from gradwatch.cli import main
from tests.cli.helpers import gradwatch_cmd, make_run

pytest.importorskip("matplotlib", reason="the plots of gradwatch report need matplotlib")


def _srcs(html: str) -> list[str]:
    return re.findall(r"""src\s*=\s*["']([^"']*)["']""", html)


def test_report_prints_summary_and_writes_self_contained_html(tmp_path, capsys):
    run = make_run(tmp_path / "a.jsonl", policy="fixed", run_name="first")
    out = tmp_path / "rep"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "run first" in text and "60 steps" in text
    assert "global norm (every step): p5" in text and "median" in text
    assert re.search(r"clipped by gradwatch: \d+/60 steps", text)
    assert "rnn: through time (step 60): 0.95/step, horizon 50/50 steps" in text
    html = (out / "report.html").read_text()
    srcs = _srcs(html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing points at a file
    assert "<link" not in html and "<script" not in html
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"global_norm.png", "dynamics.png", "temporal_compare.png", "temporal_first.png", "layers_first.png"} <= set(
        pngs
    )
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_overlays_several_runs_and_handles_nonfinite_norms(tmp_path, capsys):
    a = make_run(tmp_path / "a.jsonl", run_name="same")
    b = make_run(tmp_path / "b.jsonl", nan_at=(10, 11, 12, 13, 14, 15), run_name="same")
    out = tmp_path / "rep"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "non-finite 6" in text
    assert "nonfinite" in text  # events by kind
    html = (out / "report.html").read_text()
    assert "same (a)" in html and "same (b)" in html  # same run name: told apart by file
    assert (out / "global_norm.png").stat().st_size > 10_000


def test_report_on_torn_last_line_warns_and_reports_the_rest(tmp_path):
    run = make_run(tmp_path / "torn.jsonl")
    with open(run, "a") as f:
        f.write('{"type": "record", "step": 61, "glob')
    res = gradwatch_cmd("report", str(run), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    assert "warning" in res.stderr and "incomplete" in res.stderr
    assert "Traceback" not in res.stderr
    assert "60 steps" in res.stdout
    assert (tmp_path / "rep" / "report.html").exists()


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    not_jsonl = tmp / "notes.txt"
    not_jsonl.write_text("this is not JSON\nat all\n")
    other_schema = tmp / "other.jsonl"
    other_schema.write_text(json.dumps({"type": "header", "schema": "gradwatch/99"}) + "\n")
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    binary = tmp / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    (tmp / "adir").mkdir()
    return {
        "missing": tmp / "nope.jsonl",
        "not_jsonl": not_jsonl,
        "other_schema": other_schema,
        "directory": tmp / "adir",
        "empty": empty,
        "binary": binary,
    }


@pytest.mark.parametrize("case", ["missing", "not_jsonl", "other_schema", "directory", "empty", "binary"])
def test_report_bad_input_is_one_line_and_exit_status_2(tmp_path, case):
    path = _bad_inputs(tmp_path)[case]
    res = gradwatch_cmd("report", str(path), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert str(path) in lines[0]
    assert not (tmp_path / "rep" / "report.html").exists()


def test_report_bad_file_among_good_ones_still_fails_cleanly(tmp_path, capsys):
    good = make_run(tmp_path / "good.jsonl")
    assert main(["report", str(good), str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err


def test_report_without_matplotlib_prints_summary_and_says_how_to_get_plots(tmp_path):
    run = make_run(tmp_path / "a.jsonl")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from gradwatch.cli import main\n"
        f"sys.exit(main(['report', {str(run)!r}, '--out', {str(tmp_path / 'rep')!r}]))\n"
    )
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pip install 'gradwatch[plot]'" in res.stderr
    assert "global norm (every step): p5" in res.stdout
    assert not list((tmp_path / "rep").glob("*.png"))
    assert "data:image" not in (tmp_path / "rep" / "report.html").read_text()


def test_report_on_a_run_that_diverged_to_nan_still_plots(tmp_path, capsys):
    import math

    import numpy as np

    import gradwatch

    path = tmp_path / "diverged.jsonl"
    mon = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=2, profile_every=2)
    mon.bind(["rnn.weight_hh_l0", "head.weight"])
    for step in range(1, 21):
        bad = step > 5
        sq = np.array([math.nan if bad else 10.0**step, math.inf if bad else 1.0])
        due = mon.profile_due()
        temporal = {"rnn": np.full(20, math.nan) if bad else np.logspace(5, 0, 20)} if due else {}
        propagation = {"rnn": {"l0": np.full(20, math.nan) if bad else np.logspace(0, -5, 20)}} if due else {}
        mon.process(StepStats(sq, temporal=temporal, propagation=propagation))
    mon.close()
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "non-finite 15" in text and "nan/step" in text
    assert (tmp_path / "rep" / "temporal_diverged.png").stat().st_size > 5_000


def test_a_layer_no_gradient_reached_reads_as_such_not_nan(tmp_path, capsys):
    """All-zero sensitivity (dead ReLUs, the demo's relu_sgd): x_1/peak is 0/0; the summary
    says no gradient reached the input, the table shows '-' (the glossary says why)."""
    import gradwatch
    from gradwatch.cli.summary import load_runs, summarize, table_rows

    path = tmp_path / "dead.jsonl"
    mon = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=5, profile_every=5)
    mon.bind(["rnn.weight_hh_l0"])
    for _ in range(10):
        profiled = mon.profile_due()
        mon.process(StepStats(np.ones(1), temporal={"rnn": np.zeros(20)} if profiled else {}))
    mon.close()
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "rnn: propagation not measured; input sensitivity 0 at every timestep" in text and "nan" not in text
    runs, _ = load_runs([path])
    head, rows = table_rows([summarize(r) for r in runs])
    assert rows[0][head.index("x_1/peak")] == "-"
    assert "no gradient reached the layer" in (tmp_path / "rep" / "report.html").read_text()
