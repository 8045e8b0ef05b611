"""report.html for people (issue 19): readable at 700 px, plots open full size, repeated
alerts grouped, a glossary whose terms are the table's column names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import gradwatch
from gradwatch import StepStats
from gradwatch.cli import main
from tests.cli.helpers import make_run


def _repeating_run(path: Path) -> Path:
    """Six vanishing alerts for one layer whose messages differ only in numbers."""
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=10, profile_every=10, alert_every=0, run_name="rep")
    m.bind(["rnn.weight_hh_l0", "head.weight"])
    for step in range(1, 61):
        prof = m.profile_due()
        rate = 0.5 + step / 1000
        m.process(StepStats(np.array([1.0, 1.0]), temporal={"rnn": np.ones(40)} if prof else {},
                            propagation={"rnn": {"l0": rate ** np.arange(40)}} if prof else {}))
    m.close()
    return path


def test_repeated_alerts_are_one_row_with_their_count_and_steps(tmp_path: Path) -> None:
    run_file = _repeating_run(tmp_path / "rep.jsonl")
    events = [e for e in gradwatch.read_run(run_file).events if e.kind == "vanishing"]
    assert len(events) >= 3
    assert main(["report", str(run_file), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    # the alert at initialisation is a row of its own; the later ones, alike but for their numbers, one row
    later = [e.step for e in events if "at initialisation" not in e.message]
    assert len(later) == len(events) - 1
    assert f"×{len(later)}" in page and f"{min(later)}–{max(later)}" in page
    assert page.count("Vanishing gradient through time") == 2


def test_glossary_defines_the_tables_columns_and_propagation_vs_sensitivity(tmp_path: Path) -> None:
    from gradwatch.cli.report import GLOSSARY
    from gradwatch.cli.summary import table_rows

    run_file = make_run(tmp_path / "a.jsonl")
    assert main(["report", str(run_file), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    terms = {t for k, _ in GLOSSARY for t in k.split(", ")}
    head, _ = table_rows([])
    assert set(head) - {"run", "layer"} <= terms
    defs = dict(GLOSSARY)
    assert "∂s_T/∂s_(T−j)" in defs["propagation"] and "vanish_ratio" in defs["horizon"]
    assert "per-step" in defs["rate/step"] and "‖∂L/∂x_t‖" in defs["sensitivity"]
    assert "timesteps back from the peak" not in page  # the old, wrong definition
    for k in defs:
        assert f"<dt>{k}</dt>" in page


def test_report_fits_700px_and_plots_open_full_size(tmp_path: Path) -> None:
    run_file = make_run(tmp_path / "a.jsonl")
    assert main(["report", str(run_file), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    css = re.search(r"<style>(.*?)</style>", page, re.DOTALL).group(1)
    narrow = re.search(r"@media \(max-width:(\d+)px\)\{(.*)\}", css, re.DOTALL)
    assert narrow and int(narrow.group(1)) >= 700
    assert ".tbl thead{display:none}" in narrow.group(2) and "attr(data-label)" in narrow.group(2)
    cells = re.findall(r"<td class='[a-z]+' data-label='([^']*)'>", page)
    assert cells and all(cells)  # every cell says its column on a narrow screen
    for png in ("global_norm.png", "dynamics.png"):
        assert f"<a href='{png}'" in page and (tmp_path / "r" / png).exists()
    assert re.search(r"td\.text\{[^}]*overflow-wrap:anywhere", css)  # alerts wrap, never cut
