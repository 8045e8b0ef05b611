"""``gradwatch report`` on files nobody should trust: one line and exit status 2 for what
is not a run file, and names that can neither drive the terminal nor break the plots."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gradwatch.cli import main
from tests.cli.helpers import gradwatch_cmd

pytest.importorskip("matplotlib", reason="the plots of gradwatch report need matplotlib")

HEADER = '{"type":"header","schema":"gradwatch/1","run_name":"r"}'
GOOD = '{"type":"record","step":5,"global_norm":1.5,"param_norms":{"w":1.5},"layer_norms":{"l":1.5}}'

HOSTILE = {
    "nested_arrays": "[" * 100_000 + "]" * 100_000,
    "step_1e999": '{"type":"record","step":1e999,"global_norm":1.0}',
    "step_infinity": '{"type":"record","step":Infinity,"global_norm":1.0}',
    "param_norms_list": '{"type":"record","step":1,"global_norm":1.0,"param_norms":[1.0,2.0]}',
    "summary_suppressed": '{"type":"summary","steps":3,"suppressed":[{"kind":"x","count":"many","first_step":1}]}',
    "event_layer_list": '{"type":"event","kind":"exploding","step":1,"severity":30,"message":"m","layer":["a","b"]}',
}


@pytest.mark.parametrize("case", [*HOSTILE, "dev_zero"])
def test_hostile_file_is_one_line_and_exit_status_2(tmp_path, case):
    path = tmp_path / "run.jsonl"
    if case == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        path.write_text(f"{HEADER}\n{HOSTILE[case]}\n{GOOD}\n")
    res = gradwatch_cmd("report", str(path), "--out", str(tmp_path / "rep"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"gradwatch report: {path}")
    assert not (tmp_path / "rep" / "report.html").exists()


def _run_file(path, run_name, layer="enc", message="m", kind="exploding"):
    import json

    header = {"type": "header", "schema": "gradwatch/1", "run_name": run_name}
    lines = [json.dumps(header)]
    lines.append(json.dumps({"type": "event", "kind": kind, "step": 3, "severity": 30, "message": message, "layer": layer}))
    lines.append(json.dumps({"type": "norms", "first_step": 1, "values": [1.0, 2.0, 40.0, 2.0, 1.5, 1.2]}))
    lines.append(
        json.dumps(
            {
                "type": "record",
                "step": 6,
                "global_norm": 1.2,
                "param_norms": {f"{layer}.w": 1.0, "head.w": 0.6},
                "layer_norms": {layer: 1.0, "head": 0.6},
                "temporal": {
                    layer: {
                        "norms": [1e-3, 0.1, 1.0],
                        "gain": 0.1,
                        "horizon": 2,
                        "propagation": [1.0, 0.1, 0.01],
                        "recurrences": {"l0": {"gains": [1.0, 0.1, 0.01], "rate": 0.1, "horizon": 3}},
                    }
                },
            }
        )
    )
    path.write_text("\n".join(lines) + "\n")
    return path


ANSI = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred"


def test_names_with_terminal_escapes_are_printed_escaped(tmp_path, capsys):
    path = _run_file(tmp_path / "a.jsonl", run_name=ANSI, layer="lay\x1b[2Jer\u202eevil", message=f"msg {ANSI}")
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    out, err = capsys.readouterr()
    for text in (out, err):
        assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert r"\x1b]0;pwned\x07" in out and r"\u202e" in out  # still recognisable


def test_dollar_signs_in_names_do_not_stop_the_plots(tmp_path, capsys):
    path = _run_file(tmp_path / "a.jsonl", run_name="cost $x_$ run", layer="enc$\\frac$", kind="$x_$")
    out_dir = tmp_path / "rep"
    assert main(["report", str(path), "--out", str(out_dir)]) == 0
    err = capsys.readouterr().err
    assert "could not be drawn" not in err, err
    pngs = {p.name for p in out_dir.glob("*.png")}
    assert {"global_norm.png", "temporal_compare.png"} <= pngs and any(n.startswith("layers_") for n in pngs)
    assert "cost $x_$ run" in (out_dir / "report.html").read_text()


_NAME = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run_name=_NAME, layer=_NAME, kind=_NAME)
def test_any_names_give_a_whole_report_and_a_clean_terminal(tmp_path_factory, run_name, layer, kind):
    tmp = tmp_path_factory.mktemp("names")
    path = _run_file(tmp / "a.jsonl", run_name=run_name, layer=layer, kind=kind)
    import io

    out, err = io.StringIO(), io.StringIO()
    from gradwatch.cli.report import run_report

    assert run_report([str(path)], str(tmp / "rep"), out, err) == 0
    assert "could not be drawn" not in err.getvalue(), err.getvalue()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out.getvalue() + err.getvalue())
    assert (tmp / "rep" / "report.html").exists() and (tmp / "rep" / "global_norm.png").exists()


def test_a_plot_that_fails_leaves_the_rest_of_the_report(tmp_path, capsys, monkeypatch):
    from gradwatch.cli import plots

    def broken(*args, **kwargs):
        raise ValueError("no room")

    monkeypatch.setattr(plots, "plot_dynamics", broken)
    path = _run_file(tmp_path / "a.jsonl", run_name="r")
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert "gradient flow plot could not be drawn (ValueError: no room)" in err
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "could not be drawn" in html and (tmp_path / "rep" / "global_norm.png").exists()


_VALUE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-300, 1e150, 1e300]))


# derandomize: the same examples on every run, so CI does not fail by the luck of the draw
# (drop derandomize locally to explore); @example pins what a random draw once found.
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(norms=[(0.0, 0.0)], profile=[3.1622776603088144e146, 1.0], policy=None, log_every=1)  # a log axis to 1e294
@given(
    norms=st.lists(st.tuples(_VALUE, _VALUE), min_size=1, max_size=40),
    profile=st.lists(_VALUE, max_size=6),
    policy=st.sampled_from([None, "fixed", "zclip", "autoclip"]),
    log_every=st.integers(1, 7),
)
def test_any_numbers_a_run_can_hold_give_a_whole_report(tmp_path_factory, norms, profile, policy, log_every):
    """Valid files with NaN, Inf, zeros, huge and empty profiles: summary, tables and every
    plot are made (a plot that fails would be listed as a problem)."""
    import io

    import numpy as np

    import gradwatch
    from gradwatch import StepStats
    from gradwatch.cli.report import run_report

    tmp = tmp_path_factory.mktemp("values")
    path = tmp / "run.jsonl"
    m = gradwatch.Monitor(sinks=[f"jsonl:{path}"], log_every=log_every, profile_every=2, policy=policy)
    m.bind(["rnn.weight_hh_l0", "head.w"])
    for a, b in norms:
        with np.errstate(all="ignore"):
            sq = np.square(np.array([a, b]))
        temporal = {"rnn": np.array(profile, dtype=np.float64) ** 2} if m.profile_due() and profile else None
        m.process(StepStats(sq, temporal=temporal or {}))
    m.close()
    out, err = io.StringIO(), io.StringIO()
    assert run_report([str(path)], str(tmp / "rep"), out, err) == 0
    assert "could not be drawn" not in err.getvalue(), err.getvalue()
