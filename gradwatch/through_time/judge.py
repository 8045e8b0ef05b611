"""Vanishing and exploding gradients through time: the judgement and its words.

Judged on propagation only (the product of the recurrent Jacobians ds_t/ds_{t-1}, Pascanu
et al. 2013), never on the input-gradient profile, which says which timesteps the loss
uses, not whether the recurrence can carry a gradient:

* *exploding*: a recurrence's largest gain ``max_gains`` (the largest singular value of
  ds_T/ds_{T-j}, max over the probed sequences) exceeds ``explode_ratio``;
* *vanishing*: its horizon (steps back until ``max_gains`` falls below ``vanish_ratio``)
  is shorter than the sequence and its fitted rate is below 1 (so a vanishing alert never
  carries a rate above 1: a profile that dips and recovers is not a vanishing gradient).

One alert per layer, for its worst recurrence, naming the layer and the recurrence. An
alert at step 1 says it describes the weights before any update ("at initialisation"); the
layer is judged again on later profiles (the rate limiter lets one through every
``alert_every`` steps, and one that is markedly worse at once). Remedies fit the layer
(never "use an LSTM" to an LSTM) and what the model already has (the forget-gate bias the
backend read from the weights, a clipping policy already on): facts the backend reports in
``view.meta`` (``recurrent_layers``: layer -> kind; ``forget_bias``: layer -> the smallest
mean forget-gate bias of its recurrences; ``no_gate_bias``: layer -> the gate projection
that has no bias, minGRU / minLSTM; ``recurrence_weights``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from gradwatch.events import GradEvent
from gradwatch.formatting import fmt, layer_spectral
from gradwatch.options import Options
from gradwatch.records import Propagation, StepRecord

if TYPE_CHECKING:
    from gradwatch.view import MonitorView

try:  # the modern recurrences' own remedies (minGRU, Mamba, xLSTM, RG-LRU, ...)
    from gradwatch.through_time.families import REMEDIES as _MODERN
except ImportError:  # pragma: no cover - not shipped yet
    _MODERN: Mapping[str, Mapping[str, str]] = {}

__all__ = ["Stateless", "TemporalDetector", "family", "remedy"]

#: Kinds of recurrence -> the family whose remedies apply.
_FAMILIES = {
    "lstm": "lstm",
    "gru": "gru",
    "rnn_tanh": "rnn",
    "rnn_relu": "rnn",
    "rnn_sigmoid": "rnn",
    "rnn_linear": "rnn",
}


def family(kind: str | None) -> str:
    """ "lstm", "gru", "rnn", or a modern family's own name ("mingru", "mamba", ...)."""
    k = (kind or "").lower()
    if k in _FAMILIES:
        return _FAMILIES[k]
    if k in _MODERN:
        return k
    if k.startswith("rnn_") or not k:  # a plain RNN with another activation (Keras' SimpleRNN)
        return "rnn"
    if "lstm" in k and not k.startswith(("slstm", "mlstm", "minlstm")):
        return "lstm"
    return k


def _policy_text(view: MonitorView) -> str:
    name = view.policy_name
    if name is None:
        return (
            "a clipping policy (policy='zclip', or 'fixed' with max_norm) keeps such a step from wrecking the weights"
        )
    return f"your policy {name!r} already clips the update, which keeps a step from wrecking the weights but not the recurrence from amplifying"


def remedy(kind: str | None, direction: str, view: MonitorView, facts: Mapping[str, Any]) -> str:
    """The remedies sentence for a layer of ``kind`` whose gradient ``direction``
    ("vanishing" or "exploding") through time, given what the model already has."""
    fam = family(kind)
    own = _MODERN.get(fam, {}).get(direction)
    if direction == "vanishing" and facts.get("no_gate_bias"):  # a bias the layer does not have
        own = _MODERN.get(fam, {}).get("vanishing_no_bias", own)
    if direction == "exploding":
        scale = (
            "a smaller recurrent weight scale (largest singular value near or below 1: orthogonal initialisation, "
            "a smaller initial scale)"
            if fam in ("rnn", "lstm", "gru")
            else (own or "a smaller decay range")
        )
        return f"Remedies: {scale}; {_policy_text(view)}."
    if own:
        return f"Remedies: {own}"
    if fam == "rnn":
        return (
            "Remedies: a gated cell (an LSTM or GRU layer) in place of the plain RNN, orthogonal initialisation of the "
            "recurrent weights, or shorter truncated sequences (a smaller bptt)."
        )
    if fam == "lstm":
        bias = facts.get("forget_bias")
        if isinstance(bias, (int, float)) and math.isfinite(bias) and bias >= 1.0:
            more = (
                "a larger one (3 to 5) lets the cell state carry the gradient further"
                if bias < 3
                else "a larger one will not carry the gradient much further"
            )
            return (
                f"Remedies: the forget-gate bias is already {fmt(bias)}: {more}; otherwise shorter truncated sequences "
                "if the task does not need the long range, or a recurrence with a longer memory (a diagonal one such "
                "as minGRU or Mamba with a slow decay)."
            )
        have = f" (it is {fmt(bias)} now)" if isinstance(bias, (int, float)) and math.isfinite(bias) else ""
        return (
            f"Remedies: a larger forget-gate bias (1 to 3){have}, so the cell state carries the gradient further; "
            "shorter truncated sequences if the task does not need the long range."
        )
    if fam == "gru":
        return (
            "Remedies: a larger update-gate bias (so the update gate stays near keeping the state and it is carried "
            "over); shorter truncated sequences if the task does not need the long range."
        )
    return "Remedies: a slower decay at initialisation (decays closer to 1), or shorter sequences if the task does not need the long range."


def _recurrence_spectral(record: StepRecord, layer: str, recurrence: str, weights: Any) -> str:
    """The largest singular value of this recurrence's own recurrent weights when measured:
    the backend names them in ``meta["recurrence_weights"]`` (layer -> recurrence -> weight
    names, the prefixes of their spectral keys), or torch's ``weight_hh_<recurrence>``;
    else the layer's largest."""
    own_w = weights.get(layer) if isinstance(weights, Mapping) else None
    prefixes = own_w.get(recurrence) if isinstance(own_w, Mapping) else None
    if prefixes:
        own = {k: v for k, v in record.spectral.items() if any(k == p or k.startswith(p + "[") for p in prefixes)}
    else:
        own = {
            k: v
            for k, v in record.spectral.items()
            if k.startswith(layer) and (f"_hh_{recurrence}[" in k or k.endswith(f"_hh_{recurrence}"))
        }
    if own:
        name, s = max(own.items(), key=lambda kv: kv[1])
        return f", largest recurrent singular value {fmt(s)} ({name})"
    return layer_spectral(record, layer)


def _when(step: int) -> str:
    return "at initialisation (step 1, before any update has moved the weights)" if step == 1 else f"at step {step}"


def _vanishing(p: Propagation) -> bool:
    r = p.rate
    return p.horizon < p.length and not (math.isfinite(r) and r >= 1.0)


class Stateless:
    """A detector that keeps no statistics of its own (nothing to save or restore); the
    base of gradwatch.detectors' stateless detectors too."""

    name: ClassVar[str] = ""

    def __init__(self, options: Options) -> None:
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def _live(view: MonitorView, name: str, layer: str, recurrence: str, fallback: Any) -> Any:
    """A fact read now from the backend (``view.live``: :class:`~gradwatch.view.ReadOnlyView`),
    else the one it reported at attach: a remedy quotes the forget-gate bias of the alerted
    recurrence as it is when the alert is written, not as it was at step 0."""
    fn = (getattr(view, "live", None) or {}).get(name)
    if fn is None:
        return fallback
    try:
        value = fn(layer, recurrence)
    except Exception:  # noqa: BLE001 - a fact is optional; the alert is not
        return fallback
    return fallback if value is None else value


class TemporalDetector(Stateless):
    """Vanishing or exploding gradients through time in a recurrent layer (see the module
    docstring). Stateless: the rate limiter decides what is repeated."""

    name: ClassVar[str] = "temporal"

    def check(self, record: StepRecord, view: MonitorView) -> Sequence[GradEvent]:
        if not record.temporal:
            return ()
        o = self.options
        meta = view.meta
        kinds = meta.get("recurrent_layers") or {}
        weights = meta.get("recurrence_weights") or {}
        biases = meta.get("forget_bias") or {}
        unbiased = meta.get("no_gate_bias") or {}
        events: list[GradEvent] = []
        for layer, prof in record.temporal.items():
            recs = {k: r for k, r in prof.recurrences.items() if r.length >= 2}
            if not recs:
                continue
            kind = kinds.get(layer) if isinstance(kinds, Mapping) else None
            exploding = {k: r for k, r in recs.items() if r.peak > o.explode_ratio}
            vanishing = {k: r for k, r in recs.items() if _vanishing(r)}
            if exploding:
                rec, r = max(exploding.items(), key=lambda kv: kv[1].peak)
            elif vanishing:
                rec, r = min(vanishing.items(), key=lambda kv: kv[1].horizon)
            else:
                continue
            direction = "exploding" if exploding else "vanishing"
            attached = biases.get(layer) if isinstance(biases, Mapping) else None
            facts = {
                "forget_bias": _live(view, "forget_bias", layer, rec, attached),
                "no_gate_bias": unbiased.get(layer) if isinstance(unbiased, Mapping) else None,
            }
            said = (
                f"{direction.capitalize()} gradient through time in recurrent layer {layer!r} (recurrence {rec!r}) "
                f"{_when(record.step)}: "
            )
            why = f"{fmt(r.rate)} per step{_recurrence_spectral(record, layer, rec, weights)}."
            fix = remedy(kind, direction, view, facts)
            if exploding:
                events.append(
                    GradEvent(
                        kind="exploding",
                        step=record.step,
                        severity=logging.WARNING,
                        message=(
                            f"{said}a gradient carried back {r.peak_step} steps through the layer's state grows up to "
                            f"{fmt(r.peak)}x (largest singular value of the state Jacobian product; alert above "
                            f"{fmt(o.explode_ratio)}x); {why} {fix}"
                        ),
                        layer=layer,
                        value=r.peak,
                        threshold=o.explode_ratio,
                        worse_when="higher",  # re-alerted inside alert_every when 10x larger
                    )
                )
                continue
            gate = record.gates.get(layer)
            gate_txt = (
                f" Its mean {gate.gate} gate is {gate.mean:.2f} (memory-path gain e^{gate.log_path_gain:.1f} over "
                "the sequence)."
                if gate is not None and family(kind) != "rnn"
                else ""
            )
            events.append(
                GradEvent(
                    kind="vanishing",
                    step=record.step,
                    severity=logging.WARNING,
                    message=(
                        f"{said}even along its most amplified direction, a gradient carried back through the layer's "
                        f"state falls below {fmt(o.vanish_ratio)} of its size after {r.horizon} of {r.length} steps "
                        f"(horizon {r.horizon}); {why} The layer cannot learn dependencies longer than about "
                        f"{r.horizon} steps.{gate_txt} {fix}"
                    ),
                    layer=layer,
                    value=float(r.horizon),
                    threshold=float(r.length),
                    worse_when="lower",  # re-alerted inside alert_every when the horizon halves
                )
            )
        return events
