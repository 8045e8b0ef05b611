"""Write docs/reference.md, the user reference, from gradwatch's own docstrings.

    python docs/gen_reference.py            # writes docs/reference.md beside this script
    python docs/gen_reference.py OUT.md     # writes OUT.md

Imports only the core (numpy + pluggy; no framework): the trainer callbacks are named
with their module paths and described in the README. docs/API.md stays what it is, the
internal contract; this page is what a user looks things up in.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's gradwatch, also when not installed

import gradwatch  # noqa: E402
from gradwatch import display, policies  # noqa: E402
from gradwatch.options import Options  # noqa: E402
from gradwatch.watch import Watch  # noqa: E402


def _doc(obj: Any) -> str:
    return inspect.getdoc(obj) or ""


def _sig(name: str, obj: Any) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        sig = "(...)"
    sig = re.sub(r"(: |-> )'([^']*)'", r"\1\2", sig)  # annotations kept as strings (PEP 563)
    sig = re.sub(r"plugin_manager: [^,)]*(, )?", "", sig).replace(", *, **", ", **").replace("*, **", "**")
    if inspect.isclass(obj):
        sig = sig.removesuffix(" -> None")
    return f"{name}{sig}"


def _option_rows() -> list[tuple[str, str, str]]:
    """(option, default, meaning) from Options' fields and the ``#:`` comments above them."""
    src = inspect.getsource(Options)
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in src.splitlines():
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"(\w+): .*", s)
        if m and pending:
            comments[m.group(1)] = " ".join(pending)
        pending = []
    rows = []
    for f in dataclasses.fields(Options):
        if f.name == "max_norm_given":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, repr(list(default) if isinstance(default, tuple) else default), comments.get(f.name, "")))
    return rows


def _members(cls: type) -> list[tuple[str, Any]]:
    out = []
    for name, obj in vars(cls).items():
        if name.startswith("_") and name not in ("__enter__",):
            continue
        out.append((name, obj))
    return out


def _fields_table(cls: type) -> list[str]:
    if not dataclasses.is_dataclass(cls):
        return []
    lines = ["| field | type |", "| --- | --- |"]
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        lines.append(f"| `{f.name}` | `{t.replace('|', chr(92) + '|')}` |")
    return lines


def _help(argv: list[str]) -> str:
    from gradwatch.cli import _parser

    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        try:
            _parser().parse_args([*argv, "--help"])
        except SystemExit:
            pass
    return buf.getvalue().rstrip()


def render() -> str:
    out: list[str] = [
        "# gradwatch reference",
        "",
        "Generated from the docstrings by `python docs/gen_reference.py`; edit the docstrings, then run it.",
        "The README explains when to use what; docs/API.md is the internal contract the code keeps.",
        "",
        "## Attaching",
        "",
        f"### `{_sig('gradwatch.watch', gradwatch.watch)}`",
        "",
        _doc(gradwatch.watch),
        "",
        "The same options are taken by `gradwatch.Monitor(**options)` (any framework, `monitor.observe(grads)`), "
        "`gradwatch_tf.GradWatchCallback(**options)` (Keras `fit`), "
        "`gradwatch_torch.lightning.GradWatchCallback(**options)` and "
        "`gradwatch_torch.transformers.GradWatchCallback(**options)`. Their names are typed in "
        "`gradwatch._typing.WatchOptions`, so an IDE completes them.",
        "",
        "## Options",
        "",
        "| option | default | meaning |",
        "| --- | --- | --- |",
    ]
    for name, default, meaning in _option_rows():
        cell = meaning.replace("|", "\\|")
        out.append(f"| `{name}` | `{default}` | {cell} |")
    out += ["", "A policy's own arguments go to the policy object: `policy=gradwatch.AutoClip(percentile=5)`.", ""]
    out += ["## The watch", "", _doc(Watch), ""]
    for name, obj in _members(Watch):
        target = obj.fget if isinstance(obj, property) else obj
        if not callable(target) or not _doc(target):
            continue
        head = f"`watch.{name}`" if isinstance(obj, property) else f"`watch.{_sig(name, target).replace('(self, ', '(').replace('(self)', '()')}`"
        out += [f"### {head}", "", _doc(target), ""]
    out += ["## Records and events", ""]
    for cls in (gradwatch.StepRecord, gradwatch.TemporalProfile, gradwatch.Propagation, gradwatch.ClipDecision, gradwatch.GradEvent):
        out += [f"### `gradwatch.{cls.__name__}`", "", _doc(cls), "", *_fields_table(cls), ""]
    out += ["## Policies (`gradwatch.policies`)", ""]
    for cls in (policies.FixedNorm, policies.AutoClip, policies.ZClip, policies.AGC):
        out += [f"### `{_sig('gradwatch.' + cls.__name__, cls)}`", "", _doc(cls), ""]
    out += ["## Run files", ""]
    for name in ("read_run", "read_jsonl"):
        fn = getattr(gradwatch, name)
        out += [f"### `{_sig('gradwatch.' + name, fn)}`", "", _doc(fn), ""]
    out += ["## Notebooks (`gradwatch.display`)", "", _doc(display), ""]
    for name in ("events_html", "plot", "sparkline_svg", "record_repr"):
        fn = getattr(display, name)
        out += [f"### `{_sig('gradwatch.display.' + name, fn)}`", "", _doc(fn), ""]
    out += ["## Errors", ""]
    for name in ("GradwatchError", "ConfigError", "NonFiniteGradientError", "RunFileError"):
        cls = getattr(gradwatch, name)
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        out += [f"### `gradwatch.{name}({bases})`", "", _doc(cls), ""]
    out += ["## Command line", ""]
    for argv in ([], ["demo"], ["report"]):
        out += ["```", _help(argv), "```", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else HERE / "reference.md"
    target.write_text(render(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
