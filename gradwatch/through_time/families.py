"""Recurrence families beyond nn.RNN / LSTM / GRU: what a declaration is, and what to
tell a user whose layer vanishes or explodes through time.

A *declaration* (:class:`Recurrence`) says how a backend finds a recurrence it does not
know: a module type and either how to read each step's decay from the forward (a
diagonal / gated linear recurrence, exact from its decays) or that the module is a step
cell called in a loop (``h = cell(x_t, h)``, exact through the cell's own autograd).
Backends gather declarations from their own registry and from the plugin hook
``gradwatch_register_recurrences`` (:func:`declarations`), so a package can ship the
adapter of its own layer through an entry point. This module imports no framework: a
module type may be named by its qualified name (``"mypkg.layers.MyScan"``) so that a
plugin does not import its framework to declare it.

``REMEDIES[kind]`` holds the remedy sentences for each family ("vanishing" and
"exploding"), in the same voice as the LSTM / GRU ones; ``GATES[kind]`` names the gate
whose statistics the family reports. The judgement (``judge.py``) picks them by the
layer's ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["GATES", "REMEDIES", "Recurrence", "declarations", "matches", "type_name"]


@dataclass(frozen=True)
class Recurrence:
    """How gradwatch finds and measures a recurrence it does not know.

    * ``module_type``: the layer's class, or its qualified name ``"module.Class"``
      (matched on the class and its bases, without importing anything);
    * ``decay``: for a diagonal recurrence h_t = a_t * h_{t-1} + b_t,
      ``decay(module, args, kwargs, output) -> log_a``, log a_t shaped (B, T, ...) (any
      trailing state shape; -inf allowed for a gate that closes), computed from what the
      forward saw (its arguments, its output and its parameters). gradwatch calls it on
      profiled steps only, under ``no_grad``, on the probed rows: every tensor argument
      and output whose first dimension is the batch is cut to its first ``min(B, 8)``
      rows before the call. It may instead return a pair ``(scale (B, T, E), rate (E, N))``
      meaning log a_t[e, n] = scale_t[e] * rate[e, n] (Mamba's Δ_t A): exact as well, and
      N times cheaper. For a Keras layer the signature is ``decay(layer, x) -> log_a``
      (``keras.ops``; ``x`` the probed sequences of the layer's first input), as in
      ``gradwatch_tf.register_recurrence``;
    * ``step``: True for a cell called once per timestep whose next call takes the state
      this call returned (``h = cell(x_t, h)``): measured exactly through the cell's own
      autograd (see ``gradwatch_torch._loops``; PyTorch only);
    * ``kind``: the family's name in records, alerts and remedies (``REMEDIES``);
    * ``gate``: the name of the gate that sets the decay ("forget", "update", "delta").
    """

    module_type: type | str
    decay: Callable[..., Any] | None = None
    step: bool = False
    kind: str = "custom"
    gate: str = "forget"

    def __post_init__(self) -> None:
        if (self.decay is None) == (not self.step):
            raise ValueError("a recurrence declares exactly one of decay=fn (diagonal) or step=True (a loop cell)")
        if not isinstance(self.module_type, (type, str)):
            raise TypeError(f"module_type must be a class or a qualified name, got {type(self.module_type).__name__}")

    def matches(self, cls: type) -> bool:
        """Does a module of class ``cls`` fall under this declaration?"""
        return matches(self.module_type, cls)


def matches(declared: type | str, cls: type) -> bool:
    """Does class ``cls`` fall under a declaration of ``declared``: the class (subclasses
    included) or its qualified name, matched on ``cls`` and its bases without importing
    anything. One rule for every backend's declarations (PyTorch modules, Keras layers)."""
    if isinstance(declared, type):
        return issubclass(cls, declared)
    return any(type_name(c) == declared for c in cls.__mro__)


def type_name(cls: type) -> str:
    """``"module.QualName"`` of a class (what a declaration by name matches)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def declarations(pm: Any) -> list[Recurrence]:
    """Every declaration the plugins of ``pm`` ship (``gradwatch_register_recurrences``),
    in registration order; anything that is not a :class:`Recurrence` is dropped."""
    out: list[Recurrence] = []
    for got in pm.hook.gradwatch_register_recurrences():
        out.extend(r for r in (got or []) if isinstance(r, Recurrence))
    return out


#: The gate each family reports (the one that sets its decay).
GATES: dict[str, str] = {
    "mingru": "update",
    "minlstm": "forget",
    "mamba": "delta",
    "mlstm": "forget",
    "slstm": "forget",
    "rglru": "recurrence",
    "gla": "forget",
    "hgrn": "forget",
    "rwkv6": "decay",
    "cell": "state",
    "custom": "decay",
}

_DIAG_EXPLODE = (
    "a product of decays cannot exceed 1 when every decay is at most 1: check that the decay "
    "is a gate in (0, 1] (a sigmoid, exp of a negative number) and not a raw activation, "
    "and add gradient clipping (policy=\"autoclip\")"
)

#: The projection whose output holds a family's gate, by attribute name (mingru-pytorch's
#: layers): a backend that finds it without a bias reports the fact ``no_gate_bias``
#: (layer -> this name) and the remedy says so (``"vanishing_no_bias"``) instead of
#: advising a bias the layer does not have.
GATE_PROJECTIONS: dict[str, str] = {"mingru": "to_hidden_and_gate", "minlstm": "to_hidden_and_f_i_gate"}

#: Remedy sentences per family and condition, in the voice of the LSTM / GRU remedies;
#: ``"vanishing_no_bias"`` where the gate's projection has no bias (``GATE_PROJECTIONS``).
REMEDIES: dict[str, dict[str, str]] = {
    "mingru": {
        "vanishing": (
            "the update gate z_t stays open (decay 1 - z_t small), so the state forgets within a few "
            "steps: bias the gate towards closed (a negative gate bias, e.g. -2 to -4, so 1 - z_t starts "
            "near 0.9-0.98: the gate half of to_hidden_and_gate in mingru-pytorch, the bias of gate in "
            "mingru-keras), or stack fewer minGRU layers between the input and the loss; a longer memory "
            "also needs the task's signal to reach the state"
        ),
        "vanishing_no_bias": (
            "the update gate z_t stays open (decay 1 - z_t small), so the state forgets within a few "
            "steps: to_hidden_and_gate has no bias (mingru-pytorch builds it with bias=False), so nothing "
            "holds z_t away from 0.5; give it one (nn.Linear(..., bias=True)) with the gate half "
            "initialised at -2 to -4, so 1 - z_t starts near 0.9-0.98, or stack fewer minGRU layers between "
            "the input and the loss; a longer memory also needs the task's signal to reach the state"
        ),
        "exploding": "the minGRU decay 1 - z_t is below 1, so the growth comes from outside the "
        "recurrence (the projections or the layers around it): " + _DIAG_EXPLODE,
    },
    "minlstm": {
        "vanishing": (
            "the normalised forget gate f_t / (f_t + i_t) is small: raise the forget-gate bias "
            "(+1 to +3 on the forget third of to_hidden_and_f_i_gate) or lower the input-gate bias, "
            "so the decay starts near 0.9-0.98"
        ),
        "vanishing_no_bias": (
            "the normalised forget gate f_t / (f_t + i_t) is small: to_hidden_and_f_i_gate has no bias "
            "(mingru-pytorch builds it with bias=False), so nothing holds the decay away from 0.5; give it "
            "one (nn.Linear(..., bias=True)) with the forget third initialised at +1 to +3 (or the input "
            "third lower), so the decay starts near 0.9-0.98"
        ),
        "exploding": "the minLSTM decay f_t / (f_t + i_t) is below 1, so the growth comes from "
        "outside the recurrence: " + _DIAG_EXPLODE,
    },
    "mamba": {
        "vanishing": (
            "the decay exp(Δ_t A) forgets within a few steps: Δ is too large or A too negative. "
            "Initialise the Δ bias (dt_proj.bias; Mamba-2: dt_bias) for a smaller Δ (lower dt_min / "
            "dt_max, e.g. dt_max=0.01), keep A_log at its initialisation (Mamba: S4D-real A_n = -n; "
            "Mamba-2: one A per head in A_init_range; the smallest |A| carries longest), and "
            "keep Δ's learning rate and weight decay off (A_log and dt_proj.bias are usually excluded "
            "from weight decay)"
        ),
        "exploding": (
            "exp(Δ_t A) cannot exceed 1 while A < 0: A_log (A = -exp(A_log)) keeps A negative, so a "
            "growing gradient comes from B, C, the convolution or the layers around the mixer; lower "
            "the learning rate, clip (policy=\"autoclip\"), and check the residual stream's norm"
        ),
    },
    "mlstm": {
        "vanishing": (
            "the forget gate sigmoid(f_t) (with its stabiliser m_t) forgets within a few steps: "
            "initialise the forget-gate bias higher (xLSTM's default linspace 3 to 6 keeps the decay "
            "near 0.95-0.998), or lower the input-gate bias so the stabiliser does not rescale the "
            "state away"
        ),
        "exploding": (
            "the stabilised decay exp(log f_t + m_{t-1} - m_t) is at most 1, so a growing gradient "
            "comes from the input gate's exponential (igate preactivations too large) or the "
            "normaliser: lower the input-gate bias or the learning rate, and clip (policy=\"autoclip\")"
        ),
    },
    "slstm": {
        "vanishing": (
            "the sLSTM's state shrinks every step through its forget gate and its recurrent kernel: "
            "raise the forget-gate bias (xLSTM's powerlaw_blockdependent initialisation) or use the "
            "sigmoid forget gate, so the decay starts near 1"
        ),
        "exploding": (
            "the exponential input gate grows the state: keep the stabiliser on, lower the input-gate "
            "bias or the recurrent weights' scale, and clip (policy=\"autoclip\")"
        ),
    },
    "rglru": {
        "vanishing": (
            "a^(c r_t) forgets within a few steps: initialise the recurrence parameter a (Λ) so a^c "
            "lies in 0.9-0.999 (Griffin's default), or keep the recurrence gate r_t small"
        ),
        "exploding": "a^(c r_t) is at most 1, so the growth comes from outside the recurrence: "
        + _DIAG_EXPLODE,
    },
    "gla": {
        "vanishing": (
            "the GLA decay exp(logsigmoid(gk_t) / gate_logit_normalizer) forgets within a few steps: "
            "raise gate_logit_normalizer (fla's default 16 keeps the decay at 0.96-1 at initialisation), "
            "bias gk_proj's last Linear towards a larger logit, or set clamp_min (the smallest log decay, "
            "e.g. -0.05 for a decay of at least 0.95) so no key forgets faster than that"
        ),
        "exploding": (
            "the GLA decay exp(logsigmoid(gk_t) / gate_logit_normalizer) is at most 1, so a growing gradient "
            "comes from the keys and values written into the state (k_t v_t^T), the output gate or the "
            "layers around the attention: lower the learning rate, clip (policy=\"autoclip\"), and check "
            "the residual stream's norm"
        ),
    },
    "hgrn": {
        "vanishing": (
            "the forget gate sigmoid(f_t) forgets within a few steps: f_proj has no bias, so the gate starts "
            "near 0.5 where no lower bound holds it (the first layer); keep HGRN's learnable lower bounds "
            "(use_lower_bound=True, which hold the upper layers' gates near 1), or give the forget "
            "projection a positive bias (+2 to +4, a decay near 0.9-0.98) in the layers that must remember"
        ),
        "exploding": "the HGRN decay sigmoid(f_t) (lifted to its lower bound) is below 1, so the growth "
        "comes from outside the recurrence (the input projection or the layers around it): " + _DIAG_EXPLODE,
    },
    "rwkv6": {
        "vanishing": (
            "the RWKV-6 decay exp(-exp(w_t)) forgets within a few steps: w_t is too large. Initialise "
            "the bias of w_proj's LoRA (RWKV-6's time_decay) lower, spread over channels (RWKV-6's "
            "-6 to -1 gives decays 0.998-0.69; fla's layer starts it at 0, a decay of 0.37 per step), keep "
            "the LoRA's scale small, and keep that bias out of weight decay"
        ),
        "exploding": (
            "the RWKV-6 decay exp(-exp(w_t)) is below 1, so a growing gradient comes from the keys and "
            "values written into the state, the bonus u (the current token's own term) or the layers "
            "around the attention: lower the learning rate, clip (policy=\"autoclip\"), and check the "
            "residual stream's norm"
        ),
    },
    "cell": {
        "vanishing": (
            "the cell's state Jacobian shrinks every step: add a gated or residual path to the "
            "state (h + f(x, h), a forget gate initialised open), or an initialisation that keeps "
            "its recurrent weight's largest singular value near 1"
        ),
        "exploding": (
            "the cell's state Jacobian grows every step: scale its recurrent weight down (largest "
            "singular value below 1), normalise the state, and clip (policy=\"autoclip\")"
        ),
    },
    "custom": {
        "vanishing": (
            "the declared decay forgets within a few steps: initialise the decay closer to 1 (a "
            "forget-gate bias, a smaller step size), or shorten the distance the signal must travel"
        ),
        "exploding": _DIAG_EXPLODE,
    },
}
