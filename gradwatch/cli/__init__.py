"""The ``gradwatch`` command (also ``python -m gradwatch``).

    gradwatch demo   [--out DIR] [--framework torch|keras] [--steps N]
    gradwatch report RUN.jsonl [RUN2.jsonl ...] [--out DIR]

Exit status: 0 on success, 2 for bad input (a file that is not a readable gradwatch run
file, a framework that is not installed, bad arguments), with one line on stderr and no
traceback. The heavy imports (torch, keras, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["installed_command", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (then exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 step, got {v}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gradwatch", description="See what your gradients do while you train.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="{demo,report}", parser_class=_Parser)
    d = sub.add_parser(
        "demo",
        help="train small RNN/LSTM/GRU models on a long-range task under gradwatch and write a report",
        description="Show why vanilla RNNs fail on long dependencies and what gating and clipping change: "
        "trains a tanh RNN, an LSTM, a GRU and a ReLU RNN with W_hh = 1.1*I, then that ReLU RNN with SGD without and with "
        "policy='fixed' clipping, printing the alerts a training log would show "
        "(about 1-2 minutes on 2 CPU cores), then writes one JSONL file per run, PNG plots and report.html.",
    )
    d.add_argument(
        "--out", default="gradwatch-demo", metavar="DIR", help="output directory (default: ./gradwatch-demo)"
    )
    d.add_argument(
        "--framework", choices=("torch", "keras"), default="torch", help="framework to train with (default: torch)"
    )
    d.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training steps per run (default: 600 for torch, 300 for keras)",
    )
    r = sub.add_parser(
        "report",
        help="summarise run files (JSONL) and write PNG plots and report.html",
        description="Print a summary of each run file and write PNG plots and a self-contained report.html; "
        "several runs are overlaid for comparison.",
    )
    r.add_argument("runs", nargs="+", metavar="RUN.jsonl", help="run files written by the 'jsonl:PATH' sink")
    r.add_argument(
        "--out", default="gradwatch-report", metavar="DIR", help="output directory (default: ./gradwatch-report)"
    )
    return p


def installed_command() -> str:
    """How to run gradwatch from the user's shell: ``gradwatch`` when that is on the PATH
    and is this installation; else the script beside this interpreter
    (``.venv/bin/gradwatch`` after ``make demo``, which installs into a virtual
    environment nobody activated); else ``python -m gradwatch``."""
    import os
    import shutil
    from pathlib import Path

    script = Path(sys.executable).parent / "gradwatch"
    found = shutil.which("gradwatch")
    if script.exists():
        if found and Path(found).resolve() == script.resolve():
            return "gradwatch"
        try:
            rel = os.path.relpath(script)
        except ValueError:  # another drive (Windows)
            rel = str(script)
        return rel if not rel.startswith("..") else str(script)
    if found:
        return "gradwatch"
    return f"{Path(sys.executable).name} -m gradwatch"


def _framework_missing(framework: str) -> str | None:
    import importlib.util

    module = "torch" if framework == "torch" else "keras"
    if importlib.util.find_spec(module) is None:
        extra = "torch" if framework == "torch" else "tf"
        return f"gradwatch demo: --framework {framework} needs {module}: pip install 'gradwatch[{extra}]'."
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.version:
        from gradwatch import __version__

        print(f"gradwatch {__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from pathlib import Path

    from gradwatch.formatting import printable

    if Path(args.out).exists() and not Path(args.out).is_dir():
        print(f"gradwatch {args.command}: --out {printable(args.out)} is a file; give a directory to write into.", file=sys.stderr)
        return 2
    try:
        if args.command == "report":
            from gradwatch.cli.report import run_report

            return run_report(args.runs, args.out, sys.stdout, sys.stderr)
        missing = _framework_missing(args.framework)
        if missing:
            print(missing, file=sys.stderr)
            return 2
        from gradwatch.cli.demo import run_demo
        from gradwatch.errors import ConfigError

        try:
            run_demo(args.out, args.framework, args.steps)
        except OSError as exc:
            print(f"gradwatch demo: cannot write to {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:  # e.g. the jsonl sink refusing an unwritable --out
            print(f"gradwatch demo: {exc}", file=sys.stderr)
            return 2
        return 0
    except KeyboardInterrupt:
        print(f"gradwatch {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
