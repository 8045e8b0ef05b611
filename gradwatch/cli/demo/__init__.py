"""``gradwatch demo``: why vanilla RNNs fail on long dependencies, and what gating and
clipping change, shown by training small models under gradwatch (PyTorch or Keras).

The framework modules (:mod:`gradwatch.cli.demo.torch_demo`, :mod:`gradwatch.cli.demo.keras_demo`)
are imported only when their demo runs.
"""

from __future__ import annotations

import html
import math
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

__all__ = ["DEFAULT_STEPS", "RUNS_TOLD", "STORY", "Facts", "facts", "intro", "run_demo", "story"]

#: Training steps per run at default arguments (fits the 2-minute budget on 2 CPU cores).
DEFAULT_STEPS = {"torch": 600, "keras": 300}

STORY = """\
Training signal has to travel back through time. In a vanilla RNN the gradient that
reaches timestep k is carried there by a product of Jacobians diag(f')*W_hh, one per step
in between, so it shrinks or grows geometrically. gradwatch measures that product on each
run's own sequences (its gain over j steps back: the "propagation", with its rate per step
and its horizon) and alerts on it. An LSTM's cell state and a GRU's carried state are gated
identities: while the forget (update) gate stays near 1 the gradient passes almost
unchanged. Clipping scales a gradient above a threshold back down, direction unchanged.
{runs}
What each run did is told after training, from its own numbers."""

#: The runs each framework's demo trains, as the intro tells them.
RUNS_TOLD = {
    "torch": """\
A minGRU, the kind of recurrence trained today, is a diagonal one: h_t = (1 - z_t)*h_{t-1} +
z_t*W_h x_t, so its Jacobian is diag(1 - z_t) and its propagation is the product of those
decays, which gradwatch reads exactly once the layer is declared (register_recurrence).
Seven runs put this to the test: a tanh RNN, an LSTM, a GRU, a minGRU, a ReLU RNN with
W_hh = 1.1*I, and that ReLU RNN with plain SGD on 30-step sequences, once without clipping
and once with policy='fixed'.""",
    "keras": """\
Six runs put this to the test: a tanh RNN, an LSTM, a GRU, a ReLU RNN with W_hh = 1.1*I,
and that ReLU RNN with plain SGD on 30-step sequences, once without clipping and once with
policy='fixed'.""",
}


def intro(framework: str) -> str:
    """The demo's intro for ``framework``: the theory, then the runs it trains."""
    return STORY.format(runs=RUNS_TOLD[framework])


#: The default explode_ratio / vanish_ratio, the thresholds the demo's runs are judged with.
EXPLODE_RATIO = 1e3
#: Accuracy from which a run "learned the task" (chance is 0.50).
LEARNED = 0.8


def _story_html(task: str, framework: str, runs: list[tuple[str, str]], happened: list[str]) -> str:
    e = html.escape
    items = "".join(f"<li><code>{e(n)}</code>: {e(d)}</li>" for n, d in runs)
    paras = "".join(f"<p>{e(p)}</p>" for p in [" ".join(intro(framework).split("\n"))])
    told = "".join(f"<li>{e(x)}</li>" for x in happened)
    return (
        f"<p><b>Task</b> ({e(framework)}): {e(task)}. The loss is taken at the last timestep only.</p>"
        f"{paras}<p><b>Runs</b>:</p><ul>{items}</ul>"
        f"<p><b>What happened</b> (each sentence from the run's own numbers):</p><ul>{told}</ul>"
        "<p>Read the <i>propagation</i> plots first: the gain of the recurrence's state Jacobian product over "
        "j steps back. A line that falls below 1e-3 within the sequence is a gradient that cannot reach the "
        "information it needs; one that climbs past 1e3 is an exploding one. The <i>sensitivity</i> plots "
        "beside them show which timesteps the loss draws its gradient from.</p>"
    )


def run_demo(
    out: str | Path,
    framework: str = "torch",
    steps: int | None = None,
    stream: TextIO | None = None,
    stdout: TextIO | None = None,
) -> dict[str, Any]:
    """Train the demo runs, write the JSONL files, PNGs and report.html; print the summary.

    Returns a dict with the run results, the summaries and the report files (for tests).
    """
    from gradwatch.cli import installed_command, report
    from gradwatch.cli.demo.tasks import FirstSignTask

    stream = stream if stream is not None else sys.stderr
    stdout = stdout if stdout is not None else sys.stdout
    steps = DEFAULT_STEPS[framework] if steps is None else steps
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = FirstSignTask()
    print(f"gradwatch demo ({framework}): {task.describe()}.", file=stdout)
    print(intro(framework), file=stdout)
    print(f"\nTraining {steps} steps per run; run files, plots and report.html go to {out}/", file=stdout)
    stdout.flush()
    start = time.perf_counter()
    if framework == "torch":
        from gradwatch.cli.demo import torch_demo as impl
    else:
        from gradwatch.cli.demo import keras_demo as impl  # type: ignore[no-redef]
    results = impl.train_all(out, steps, stream=stream)
    train_seconds = time.perf_counter() - start
    runs, notes = report.load_runs([r.path for r in results])
    summaries = [report.summarize(r) for r in runs]
    extra = {
        s.name: {
            "final acc": f"{r.accuracy:.2f}",
            "steps/seq": str(r.spec.length),
            "hidden": str(r.spec.hidden),
            "optimizer": f"{r.spec.optimizer} {r.spec.lr:g}",
        }
        for s, r in zip(summaries, results)
    }
    conclusions = _conclusions(results, summaries)
    happened = story(results, runs)
    files = report.write_report(
        runs,
        out,
        title=f"gradwatch demo ({framework}): vanishing and exploding gradients through time",
        intro_html=_story_html(task.describe(), framework, [(r.spec.name, r.spec.description) for r in results], happened)
        + f"<p><b>What this training run measured</b> (accuracy on {impl.EVAL_SIZE} held-out sequences; chance is 0.50):</p>"
        + f"<pre>{html.escape(conclusions.split(chr(10), 2)[-1])}</pre>",
        extra=extra,
        summaries=summaries,
        notes=notes,
    )
    print(f"\nSummary (accuracy on {impl.EVAL_SIZE} held-out sequences; chance is 0.50):", file=stdout)
    print(report.format_table(summaries, extra), file=stdout)
    print(conclusions, file=stdout)
    print("\nWhat happened:", file=stdout)
    for sentence in happened:
        print(textwrap.fill(sentence, 100, initial_indent="  - ", subsequent_indent="    "), file=stdout)
    if files.plots_missing:
        print(report.PLOT_HINT, file=sys.stderr)
    print(
        f"\nTraining took {train_seconds:.0f}s. Open {files.html} (plots: {len(files.pngs)} PNGs; run files: "
        f"{', '.join(p.path.name for p in results)}).\nReport on any run file: {installed_command()} report {out}/<run>.jsonl",
        file=stdout,
    )
    return {"results": results, "summaries": summaries, "files": files, "story": happened}


def _conclusions(results: list[Any], summaries: list[Any]) -> str:
    """Sentences built from the measured numbers (none is a constant)."""
    lines = ["", "What the numbers say:"]
    for r, s in zip(results, summaries):
        t = next(iter(s.temporal_last.values()), None)
        events = ", ".join(f"{k} {n}" for k, n in sorted(s.events_by_kind.items())) or "no events"
        clipped = f"; clipped {100 * s.clipped_share:.0f}% of steps" if s.clipped_steps else ""
        if t is None or not math.isfinite(t["step"]):
            through = "propagation not measured"
        elif math.isnan(t["gain"]) and t["horizon"] >= t["length"]:
            through = "propagation not finite (NaN: the weights diverged)"
        elif t["peak"] > EXPLODE_RATIO:
            through = f"propagation explodes ({report_fmt(t['gain'])}/step, {report_fmt(t['peak'])}x over the sequence)"
        elif t["horizon"] < t["length"]:
            through = f"propagation vanishes after {int(t['horizon'])} of {int(t['length'])} steps ({report_fmt(t['gain'])}/step)"
        else:
            through = f"propagation reaches all {int(t['length'])} steps ({report_fmt(t['gain'])}/step)"
        lines.append(f"  {r.spec.name:<15} accuracy {r.accuracy:.2f}; {through}; max norm {report_fmt(s.norm_max)}; {events}{clipped}")
    return "\n".join(lines)


def report_fmt(v: float) -> str:
    from gradwatch.cli.report import fmt

    return fmt(v)


# ------------------------------------------------------------------ the story, checked
@dataclass(frozen=True)
class Facts:
    """What one demo run's files and evaluation say, the only source of the story."""

    name: str
    cell: str
    optimizer: str
    policy: str | None
    accuracy: float
    steps: int
    length: int
    first: tuple[float, int, int, float] | None  # first measured propagation: rate, horizon, T, largest gain
    last: tuple[float, int, int, float] | None  # the latest one
    alerts: dict[str, int]  # through-time (recurrent layer) alerts by kind, held-back repeats included
    norm_max: float
    clipped_share: float
    dead_from: int | None  # first step from which the recurrent layer's gradient stayed exactly 0 to the end
    norm_alerts: int = 0  # exploding / vanishing alerts on the gradient norm (not through time)
    peak: tuple[float, int] | None = None  # the largest max gain of any measurement, and its step
    norm_median: float = math.nan
    shortest: tuple[int, int] | None = None  # the shortest horizon of any measurement, and its step
    nonfinite_steps: int = 0
    nonfinite_from: int | None = None  # the first step with a non-finite gradient


def _prop(prof: Any) -> tuple[float, int, int, float] | None:
    if not prof.recurrences or prof.horizon is None:
        return None
    from gradwatch.cli.summary import _peak_gain

    return (float(prof.gain), int(prof.horizon), len(prof.propagation), _peak_gain(prof))


def facts(result: Any, run: Any, layer: str = "rnn") -> Facts:
    """Read one run's facts from its run file and its evaluation."""
    from gradwatch.cli.summary import summarize

    s = summarize(run)
    layer = next((k for r in run.records for k in r.temporal), layer)
    stepped = [(r.step, p) for r in run.records if layer in r.temporal for p in [_prop(r.temporal[layer])] if p is not None]
    measured = [p for _, p in stepped]
    finite = [(p[3], step) for step, p in stepped if math.isfinite(p[3])]
    peak = max(finite) if finite else None
    shortest = min(((p[1], step) for step, p in stepped), default=None)
    bad = [e.step for e in getattr(run, "events", ()) if getattr(e, "kind", None) == "nonfinite"]
    alerts: dict[str, int] = {}
    norm_alerts = 0
    for (kind, where), n in s.events_by_kind_layer.items():
        if kind in ("vanishing", "exploding"):
            if where == layer:
                alerts[kind] = alerts.get(kind, 0) + n
            else:
                norm_alerts += n
    dead_from = None
    recs = [r for r in run.records if layer in r.layer_norms]
    if recs and recs[-1].layer_norms[layer] == 0.0:
        k = len(recs) - 1
        while k > 0 and recs[k - 1].layer_norms[layer] == 0.0:
            k -= 1
        dead_from = recs[k].window.first_step if recs[k].window is not None else recs[k].step
    return Facts(
        name=result.spec.name,
        cell=result.spec.cell,
        optimizer=result.spec.optimizer,
        policy=result.spec.policy,
        accuracy=result.accuracy,
        steps=s.steps,
        length=result.spec.length,
        first=measured[0] if measured else None,
        last=measured[-1] if measured else None,
        alerts=alerts,
        norm_max=s.norm_max,
        clipped_share=s.clipped_share if s.has_policy else 0.0,
        dead_from=dead_from,
        norm_alerts=norm_alerts,
        peak=peak,
        norm_median=s.norm_percentiles.get("p50", math.nan),
        shortest=shortest,
        nonfinite_steps=s.nonfinite_steps,
        nonfinite_from=min(bad) if bad else None,
    )


def _f(v: float) -> str:
    return report_fmt(v)


def _through(p: tuple[float, int, int, float] | None) -> str:
    if p is None:
        return "its propagation was not measured"
    rate, h, t, peak = p
    if not math.isfinite(rate) and not math.isfinite(peak):
        return "its propagation was not finite (NaN: the weights diverged)"
    if peak > EXPLODE_RATIO:
        return f"its propagation grows {_f(rate)}x per step, {_f(peak)}x over {t} steps (exploding above {EXPLODE_RATIO:g}x)"
    if h < t:
        return f"its propagation vanishes after {h} of {t} steps ({_f(rate)}/step)"
    return f"its propagation reaches all {t} steps ({_f(rate)}/step)"


def _alerts_text(f: Facts) -> str:
    said = ", ".join(f"{n} {k} alert{'s' if n > 1 else ''}" for k, n in sorted(f.alerts.items()))
    said = said or "no through-time alert"
    if f.norm_alerts:  # the summary table counts these among its events too
        n = f.norm_alerts
        said += f"{' and' if f.alerts else ', but'} {n} alert{'s' if n > 1 else ''} on the gradient norm itself"
    return said


def _earlier(f: Facts) -> str:
    """Where a run was alerted as exploding (or vanishing) through time but its last
    measurement is not, the sentence would read as a contradiction: say when and how far
    it crossed the line (and, for exploding, what the gradient norm did meanwhile)."""
    if f.last is None:
        return ""
    if f.alerts.get("exploding") and f.last[3] <= EXPLODE_RATIO:
        return _exploded_before(f)
    if f.alerts.get("vanishing") and f.last[1] >= f.last[2] and f.shortest is not None and f.shortest[0] < f.last[2]:
        h, step = f.shortest
        return f" at the last measurement, but earlier it vanished after as few as {h} of {f.last[2]} steps (step {step})"
    return ""


def _exploded_before(f: Facts) -> str:
    """The exploding half of :func:`_earlier`: the peak, its step, the gradient norm's
    spike (what an exploding propagation produces, and clipping is for)."""
    if f.peak is None:
        return ""
    value, step = f.peak
    if value <= EXPLODE_RATIO:
        return ""
    text = f" at the last measurement, but its most amplified direction grew up to {_f(value)}x over the sequence at step {step}"
    if math.isfinite(f.norm_median) and f.norm_median > 0 and math.isfinite(f.norm_max):
        text += f" and its gradient norm peaked at {_f(f.norm_max)} ({_f(f.norm_max / f.norm_median)}x its median)"
    return text


def _learned(f: Facts) -> str:
    if f.accuracy >= LEARNED:
        return f"it learned the task (accuracy {f.accuracy:.2f})"
    if f.accuracy < 0.6:
        return f"it did not learn the task in {f.steps} steps (accuracy {f.accuracy:.2f}, chance 0.50)"
    return f"it learned part of the task in {f.steps} steps (accuracy {f.accuracy:.2f})"


def _mingru_sentence(f: Facts, lstm: Facts | None) -> str:
    """The minGRU's sentence: its propagation at the first and the last measurement (the
    decays move as it trains), its alerts, what it learned, and, when the LSTM ran beside
    it, how their horizons compare (all from the two runs' numbers)."""
    first, last = f.first, f.last
    if first is None or last is None or first[:3] == last[:3]:
        through = _through(last)
    elif all(math.isfinite(p[0]) and p[3] <= EXPLODE_RATIO and p[1] < p[2] for p in (first, last)):  # vanished twice
        through = (
            f"its propagation vanishes after {first[1]} of {first[2]} steps at the first measurement "
            f"({_f(first[0])}/step) and after {last[1]} at the last ({_f(last[0])}/step)"
        )
    else:
        through = f"at the first measurement {_through(first)}; at the last, {_through(last)}"
    text = "The minGRU (declared with register_recurrence, measured exactly from its decays 1 - z_t): "
    text += f"{through}, {_alerts_text(f)}"
    if f.alerts.get("vanishing"):
        text += " (the alert's remedy: bias the update gate towards closed, so that 1 - z_t starts near 1)"
    text += f"; {_learned(f)}"
    if lstm is not None and lstm.last is not None and f.last is not None and f.last[2] == lstm.last[2]:
        h, t, lh = f.last[1], f.last[2], lstm.last[1]
        than = "shorter than" if h < lh else "longer than" if h > lh else "the same as"
        text += f". Its horizon ({h}/{t}) is {than} the LSTM's ({lh}/{t}), whose accuracy was {lstm.accuracy:.2f}"
    return text + "."


def story(results: list[Any], runs: list[Any]) -> list[str]:
    """One sentence per run (two for the clipping pair), each built from that run's
    numbers: a claim the numbers do not support is never printed, what did happen is."""
    fs = [facts(r, run) for r, run in zip(results, runs)]
    by = {(f.cell, f.optimizer, f.policy is not None): f for f in fs}
    out: list[str] = []
    for f in fs:
        if f.cell == "tanh":
            out.append(f"The tanh RNN: {_through(f.last)}{_earlier(f)}, {_alerts_text(f)}; {_learned(f)}.")
        elif f.cell in ("lstm", "gru"):
            cell = f.cell.upper()
            out.append(f"The {cell}: {_through(f.last)}{_earlier(f)}, {_alerts_text(f)}; {_learned(f)}.")
        elif f.cell == "mingru":
            out.append(_mingru_sentence(f, by.get(("lstm", "adam", False))))
        elif f.cell == "relu" and f.optimizer != "sgd":
            early = _through(f.first).replace("its propagation", "its propagation at the first measurement")
            out.append(
                f"The ReLU RNN with W_hh = 1.1*I: {early}; its gradient norm reached {_f(f.norm_max)}, "
                f"{_alerts_text(f)}; {_learned(f)}."
            )
        elif f.cell == "relu" and f.policy is None:
            if f.nonfinite_steps:
                first = f", the first at step {f.nonfinite_from}" if f.nonfinite_from is not None else ""
                nan = f.last is not None and not math.isfinite(f.last[0]) and not math.isfinite(f.last[3])
                dead = f"its gradient was not finite on {f.nonfinite_steps} steps{first}" + (" (the weights diverged)" if nan else "")
            elif f.dead_from is not None:
                dead = f"from step {f.dead_from} on its recurrent layer got exactly zero gradient (every ReLU dead)"
            else:
                dead = "its recurrent layer still got a gradient at the end"
            out.append(
                f"The ReLU RNN with SGD on {f.length}-step sequences, unclipped: its gradient norm reached "
                f"{_f(f.norm_max)}; {dead}; {_alerts_text(f)}; {_learned(f)}."
            )
        elif f.cell == "relu":
            out.append(
                f"The same with policy='{f.policy}': gradwatch clipped {100 * f.clipped_share:.0f}% of its steps; "
                f"{_through(f.last)}; {_learned(f)}."
            )
    plain, clipped = by.get(("relu", "sgd", False)), by.get(("relu", "sgd", True))
    if plain and clipped:
        if clipped.accuracy >= LEARNED > plain.accuracy:
            out.append(f"Clipping decided the outcome: accuracy {plain.accuracy:.2f} without, {clipped.accuracy:.2f} with.")
        else:
            out.append(
                f"In this run clipping did not decide the outcome: accuracy {plain.accuracy:.2f} without, "
                f"{clipped.accuracy:.2f} with (more --steps may change that)."
            )
    return out
