"""What the Lightning and Hugging Face callbacks share: log keys, AMP skips, clip wording.

Both callbacks are thin adapters over :class:`gradwatch.Watch`; this module holds the
little they have in common so the two cannot drift apart: the ``gradwatch/...`` metrics
a trainer's loggers receive, how to tell that ``torch.amp.GradScaler`` is about to skip
the step, and the sentence that explains how a gradwatch policy and the trainer's own
gradient clipping combine.
"""

from __future__ import annotations

import math
from typing import Any

from gradwatch.records import StepRecord

__all__ = ["AUTO_LAYERS", "PREFIX", "THROUGH_TIME_KEYS", "TrainerMetrics", "clip_interaction", "scaler_will_skip"]

#: Every key a trainer's loggers receive from gradwatch starts with this.
PREFIX = "gradwatch/"

#: The keys of a propagation measurement: logged only on the log whose window measured it.
THROUGH_TIME_KEYS = (f"{PREFIX}propagation_rate/", f"{PREFIX}horizon/")

#: ``log_layers=None`` logs per-layer keys for models of at most this many layers. A
#: 12-block transformer has about 200 (gradwatch's layer of a parameter is the module
#: holding it): one key each would flood the console line the Hugging Face Trainer
#: prints at every log and a tracker's dashboard; the records keep every layer anyway.
AUTO_LAYERS = 16


class TrainerMetrics:
    """The ``gradwatch/...`` numbers of the latest step, flat, for a trainer's loggers.

    Latest step: ``gradwatch/grad_norm`` (global, before any clipping),
    ``gradwatch/grad_norm/<layer>`` (``layers`` True: always; None: for models of at most
    :data:`AUTO_LAYERS` layers; False: never), and with a policy
    ``gradwatch/clip_scale`` and ``gradwatch/clip_threshold`` (once the policy has a finite
    threshold: none during a warm-up).

    Since the previous :meth:`metrics` call (trainers log every N steps, and a spike
    between two log lines must not be lost): ``gradwatch/grad_norm_max``,
    ``gradwatch/clipped_steps`` (steps a policy made smaller; with a policy) and
    ``gradwatch/skipped_steps`` (``on_nonfinite="skip"``; when there were some).

    Per recurrent layer whose propagation was measured since the previous :meth:`metrics`
    call (its latest measurement there): ``gradwatch/propagation_rate/<layer>`` (gain per
    step back in time: < 1 vanishing, > 1 exploding) and ``gradwatch/horizon/<layer>``
    (timesteps the gradient reaches back). A log whose window measured nothing carries
    neither: an older measurement is never logged again as if it were new, and a profile
    without a propagation measurement (rate NaN, horizon None) is never logged.
    """

    def __init__(self, layers: bool | None = None) -> None:
        self.layers = layers
        self.last: StepRecord | None = None
        self._profile: dict[str, float] = {}
        self._window_max = -math.inf
        self._window_clipped = 0
        self._window_skipped = 0

    def update(self, record: StepRecord | None) -> None:
        """Take one step's record (cheap: a few comparisons; nothing is logged here)."""
        if record is None:
            return
        self.last = record
        n = record.global_norm
        if not math.isnan(self._window_max) and not n <= self._window_max:  # NaN wins: a non-finite step must show
            self._window_max = n
        if record.clip is not None and record.clip.scale < 1.0:
            self._window_clipped += 1
        if record.skipped:
            self._window_skipped += 1
        for layer, p in record.temporal.items():
            if p.recurrences and p.horizon is not None and math.isfinite(p.gain):  # measured at this step
                self._profile[f"{THROUGH_TIME_KEYS[0]}{layer}"] = float(p.gain)
                self._profile[f"{THROUGH_TIME_KEYS[1]}{layer}"] = float(p.horizon)

    def metrics(self, new_window: bool = True) -> dict[str, float]:
        """The keys above for the latest record ({} before the first step). With
        ``new_window`` (a trainer's log line is written now) the window keys and the
        propagation keys start afresh; without (Lightning's per-step ``log_dict``, which
        its logger throttles) they keep accumulating."""
        r = self.last
        if r is None:
            return {}
        out: dict[str, float] = {f"{PREFIX}grad_norm": float(r.global_norm)}
        if self._window_max != -math.inf:
            out[f"{PREFIX}grad_norm_max"] = float(self._window_max)
        if r.clip is not None or self._window_clipped:
            out[f"{PREFIX}clipped_steps"] = float(self._window_clipped)
        if self._window_skipped:
            out[f"{PREFIX}skipped_steps"] = float(self._window_skipped)
        if new_window:
            self._window_max = -math.inf
            self._window_clipped = self._window_skipped = 0
        if self.layers or (self.layers is None and len(r.layer_norms) <= AUTO_LAYERS):
            for layer, v in r.layer_norms.items():
                out[f"{PREFIX}grad_norm/{layer}"] = float(v)
        if r.clip is not None:
            if math.isfinite(r.clip.threshold):  # no threshold yet (a policy's warm-up): no point
                out[f"{PREFIX}clip_threshold"] = float(r.clip.threshold)
            out[f"{PREFIX}clip_scale"] = float(r.clip.scale)
        out.update(self._profile)
        if new_window:
            self._profile = {}
        return out


def scaler_will_skip(scaler: Any, optimizer: Any) -> bool:
    """True when ``scaler`` (a ``torch.amp.GradScaler``) has unscaled ``optimizer``'s
    gradients and found Inf/NaN in them, so its ``step()`` will not call
    ``optimizer.step()`` at all.

    A plain PyTorch loop never shows gradwatch such a step (the step pre-hook does not
    run); the trainers call their pre-step hooks before the scaler decides, so the
    callbacks ask here to stay consistent: the scaler's overflow steps (routine while it
    searches for its scale) are neither recorded nor alerted on. Reads the scaler's
    per-optimizer state (``found_inf_per_device``), the very values ``scaler.step`` reads
    next (the ``.item()`` sync is one it does anyway); anything unexpected counts as "not
    skipping", so gradwatch measures as usual.
    """
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return False
    try:
        state = scaler._per_optimizer_states.get(id(optimizer))
        found = state.get("found_inf_per_device") if state else None
        if not found:
            return False
        return bool(sum(float(v.item()) for v in found.values()))
    except Exception:  # noqa: BLE001 - a private structure changed: measure as usual
        return False


def clip_interaction(policy: str, trainer_clip: str, off: str) -> str:
    """The sentence both callbacks log once when a gradwatch policy and the trainer's own
    clipping are both active."""
    return (
        f"gradwatch: both the gradwatch policy {policy!r} and {trainer_clip} clip the gradients. gradwatch measures "
        f"the gradient before either clips, applies its policy first, then the trainer's own clipping caps what "
        f"is left: every step the tighter of the two thresholds wins, and records show the pre-clip norm with "
        f"gradwatch's decision only. To let the policy alone decide, turn the trainer's clipping off ({off})."
    )


class NotKeras:
    """What a torch trainer callback says when it is handed to Keras' ``fit``: Keras 3
    reads ``async_safe`` (JAX and torch backends) and calls ``set_params`` / ``set_model``
    on each callback; each raises a TypeError naming the Keras callback. ``_not_keras`` is
    the sentence (the callback's own class says what it is for)."""

    _not_keras: str = "This is a PyTorch trainer callback; Keras' model.fit needs gradwatch_tf.GradWatchCallback."

    def set_model(self, model: Any) -> None:
        raise TypeError(self._not_keras)

    def set_params(self, params: Any) -> None:
        raise TypeError(self._not_keras)

    @property
    def async_safe(self) -> bool:
        raise TypeError(self._not_keras)
