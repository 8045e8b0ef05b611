"""The command itself: ``python -m gradwatch``, help, usage errors."""

from __future__ import annotations

from tests.cli.helpers import gradwatch_cmd


def test_python_dash_m_gradwatch_shows_both_commands():
    res = gradwatch_cmd("--help")
    assert res.returncode == 0
    assert "demo" in res.stdout and "report" in res.stdout


def test_no_command_is_exit_status_2():
    res = gradwatch_cmd()
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_usage_error_is_one_line_and_exit_status_2():
    res = gradwatch_cmd("demo", "--steps", "zero")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1
    assert "--steps" in res.stderr


def test_report_needs_a_file():
    res = gradwatch_cmd("report")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1


def test_importing_the_cli_and_report_pulls_in_no_framework_or_matplotlib():
    import subprocess
    import sys

    code = (
        "import sys, gradwatch.cli, gradwatch.cli.report, gradwatch.cli.demo\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'matplotlib') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_out_that_is_a_file_is_one_line_and_exit_status_2(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for args in (("report", str(f), "--out", str(f)), ("demo", "--out", str(f), "--steps", "1")):
        res = gradwatch_cmd(*args)
        assert res.returncode == 2
        assert res.stderr.strip().count("\n") == 0 and "is a file" in res.stderr
