"""The demo's progress bar: one redrawn line on a terminal, a line per quarter in a log."""

from __future__ import annotations

import io

from gradwatch.cli.demo._progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_into_a_file_prints_one_line_per_quarter():
    out = io.StringIO()
    bar = Progress("lstm", 100, out)
    for i in range(1, 101):
        bar.update(i, "loss 0.5")
    bar.close("accuracy 0.9")
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert "100/100" in lines[-1] and "[" + "#" * 24 + "]" in lines[-1]


def test_progress_on_a_terminal_redraws_and_blanks_longer_leftovers():
    out = _Tty()
    bar = Progress("lstm", 10, out)
    bar.update(10, "loss 0.123456789 |g| 1.0e+00")
    bar.close("acc 0.9")
    last = out.getvalue().split("\r")[-1]
    assert last.endswith("\n") and "acc 0.9" in last and "|g|" not in last
    assert len(last.rstrip("\n")) >= len(out.getvalue().split("\r")[-2])
