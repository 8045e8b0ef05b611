"""Text a person reads: numbers in alerts, the non-finite sentence, the summary line.

One home for wording, so the event, the exception and the log line say the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gradwatch.records import StepRecord, WindowStats

__all__ = [
    "CEILING_RTOL",
    "clip_hint",
    "fmt",
    "layer_spectral",
    "measured_steps",
    "nonfinite_message",
    "printable",
    "summary_line",
]

#: A norm within this relative distance of the largest counts as "at the ceiling": a
#: gradient clipped before gradwatch measured it (``clip_grad_norm_`` leaves its norm at
#: max_norm * n / (n + 1e-6)), while unclipped norms almost never repeat to four digits.
CEILING_RTOL = 1e-4

#: A flush window needs this many steps before the INFO line calls a constant norm clipped.
CEILING_MIN_STEPS = 5


def fmt(x: float | None) -> str:
    """A number as a person reads it in an alert: 3 significant digits."""
    if x is None:
        return "n/a"
    return f"{x:.3g}"


_ACTION = {
    "warn": "The optimizer step went ahead with these values (on_nonfinite='warn'); pass "
    "on_nonfinite='skip' to skip such steps or 'raise' to stop.",
    "skip": "The optimizer step was skipped: weights and optimizer state are unchanged.",
    "raise": "Training was stopped before the optimizer step (on_nonfinite='raise').",
}


def nonfinite_message(step: int, params: Sequence[str], layer: str | None, on_nonfinite: str) -> str:
    """The sentence used both for the event and for ``NonFiniteGradientError``."""
    shown = ", ".join(repr(p) for p in params[:5])
    more = f" and {len(params) - 5} more" if len(params) > 5 else ""
    where = f" in layer {layer!r}" if layer else ""
    return (
        f"Non-finite gradient (NaN or Inf) at step {step}{where}: parameter{'s' if len(params) > 1 else ''} "
        f"{shown}{more}. {_ACTION[on_nonfinite]} Usual causes: a learning rate too high, a log or "
        f"division of zero in the loss, or a bad input batch."
    )


#: Unicode categories never printed raw: controls (ESC starts the sequences that retitle
#: or clear a terminal), format characters (bidi overrides reorder what a person reads),
#: line / paragraph separators, surrogates, private use and unassigned code points.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})


def printable(text: object, limit: int = 200) -> str:
    """``text`` safe to print on a terminal: one line, no control or format character.

    Names in a run file come from whoever wrote it; a name holding ``ESC ]0;...`` would
    retitle the terminal, ``ESC [2J`` clear it. Every such character is shown as its
    Python escape (``\\x1b``, ``\\u202e``), so the name stays recognisable; tabs become a
    space. Longer than ``limit`` characters: cut, with ``…`` at the end.
    """
    import unicodedata

    s = text if isinstance(text, str) else str(text)
    if len(s) > limit:
        s = s[: max(0, limit - 1)] + "…"
    if s.isprintable():  # the common case: nothing to do (str.isprintable is C-fast)
        return s
    out = []
    for ch in s:
        if ch == "\t":
            out.append(" ")
        elif ch.isprintable() or unicodedata.category(ch) not in _UNPRINTABLE:
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def clip_hint(record: StepRecord) -> str:
    """What the policy did about a large norm, or which policy would help."""
    if record.clip is not None:
        if record.clip.clipped:
            return (
                f"Policy {record.clip.policy!r} scaled it by {fmt(record.clip.scale)} "
                f"(threshold {fmt(record.clip.threshold)})."
            )
        return f"Policy {record.clip.policy!r} did not clip it (threshold {fmt(record.clip.threshold)})."
    return "Consider clipping: policy='zclip' (adaptive) or policy='fixed' with max_norm."


def layer_spectral(record: StepRecord, layer: str) -> str:
    """", largest recurrent singular value 1.1 (rnn.weight_hh_l0)" when measured."""
    best: tuple[float, str] | None = None
    for name, s in record.spectral.items():
        if name.startswith((layer + ".", layer + "/", layer + "[")):
            if best is None or s > best[0]:
                best = (s, name)
    if best is None:
        return ""
    return f", largest recurrent singular value {fmt(best[0])} ({best[1]})"


def summary_line(record: StepRecord) -> str:
    """The INFO line of a flushed record, as a person reads it in a training log."""
    w = record.window
    parts = [f"step {record.step}: grad norm {fmt(record.global_norm)}"]
    if w is not None and w.steps > 1:
        parts[0] += f" (last {w.steps} steps: min {fmt(w.norm_min)}, mean {fmt(w.norm_mean)}, max {fmt(w.norm_max)})"
        if _at_ceiling(w):
            at = fmt(w.norm_max)
            parts.append(
                f"{at} on every step: clipped before gradwatch measured? (e.g. clip_grad_norm_ before "
                f"optimizer.step(); policy='fixed', max_norm={at} clips the same and records the norms before it)"
            )
    if record.clip is not None:
        share = f"{w.clipped}/{w.steps} steps" if w is not None else ("this step" if record.clip.clipped else "none")
        parts.append(f"clipped {share} by {record.clip.policy!r} (threshold {fmt(record.clip.threshold)})")
    if w is not None and w.skipped:
        parts.append(f"skipped {w.skipped} step{'s' if w.skipped > 1 else ''}")
    if w is not None and w.nonfinite:
        parts.append(f"non-finite on {w.nonfinite} step{'s' if w.nonfinite > 1 else ''}")
    measured_at = measured_steps(record)
    for layer, prof in record.temporal.items():
        if not prof.recurrences or prof.horizon is None:  # not measured in this window: nothing to say
            continue
        at = measured_at.get(layer, record.step)
        when = f" (measured at step {at})" if at != record.step else ""
        parts.append(f"{layer}: {fmt(prof.gain)}/step through time, horizon {prof.horizon}/{prof.length}{when}")
    return " | ".join(parts)


def _at_ceiling(w: WindowStats) -> bool:
    """Every step of the window at one norm (to :data:`CEILING_RTOL`) that gradwatch's own
    policy did not clip: a gradient clipped before gradwatch saw it, the reading a person
    needs for "min 0.5, mean 0.5, max 0.5" (the report's note says the same of a run)."""
    finite = w.steps - w.nonfinite
    if w.clipped or finite < CEILING_MIN_STEPS or not (w.norm_max > 0 and w.norm_min == w.norm_min):
        return False
    return w.norm_min >= w.norm_max * (1 - CEILING_RTOL)


def measured_steps(record: StepRecord) -> Mapping[str, int]:
    """layer -> the step its propagation in ``record.temporal`` was measured at, where
    that is known and may differ from ``record.step`` (a flushed record: see
    :class:`gradwatch.dispatch.WindowProfiles`); a layer left out was measured at
    ``record.step``."""
    out = dict(getattr(record.temporal, "measured_at", None) or {})
    for layer, prof in record.temporal.items():
        at = getattr(prof, "measured_at", None)  # should a profile carry its own step one day
        if isinstance(at, int):
            out[layer] = at
    return out
