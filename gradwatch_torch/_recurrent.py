"""Through-time probes for recurrent layers: per-timestep input gradients, spectral norms
of the recurrent weights, LSTM forget-gate statistics.

Each probe is a pair of module hooks plus, on profiled steps only, one tensor hook on the
layer's input. Everything a probe measures stays on the device until the step's single
host copy (:class:`gradwatch_torch.attach.TorchAttachment` gathers it). A probe that hits
a bug logs once at ERROR on the ``gradwatch`` logger and switches itself off: profiling
must never break training.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradwatch_torch._gates import lstm_forget_stats, packed_lstm_forget_stats
from gradwatch_torch._tensors import SpectralTracker, _profile_dtype, packed_timestep_sq_norms, timestep_sq_norms

logger = logging.getLogger("gradwatch")

#: Gate blocks of ``weight_hh`` in PyTorch's storage order.
GATES: dict[str, tuple[str, ...]] = {
    "LSTM": ("i", "f", "g", "o"),
    "GRU": ("r", "z", "n"),
    "RNN": ("",),
}

#: Sequences of the batch the gate statistics are recomputed on. Recomputing one gate
#: costs about a quarter of the layer's forward matmuls per sequence; 4 sequences keep it
#: near 1% of a step at batch 32 while the mean over time and units stays well estimated.
GATE_SAMPLE = 4

#: Cell calls remembered within one step; a cell driven for longer than this without an
#: optimizer step (an evaluation loop with grad enabled, say) stops adding timesteps, so
#: memory stays bounded.
MAX_CELL_STEPS = 100_000


def _family(module: nn.Module) -> str | None:
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "LSTM"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "GRU"
    if isinstance(module, (nn.RNN, nn.RNNCell)):
        return "RNN"
    return None


def _outside_backward() -> bool:
    getter = getattr(torch._C, "_current_graph_task_id", None)
    return getter is None or getter() == -1


def _probe_input(x: Tensor, on_grad: Callable[[Tensor], None]) -> Tensor:
    """Return a tensor equal to ``x`` whose gradient is reported to ``on_grad``.

    A raw input (no grad) is replaced by ``x.detach().requires_grad_()``: nothing upstream
    needs its gradient, and the user's tensor keeps ``.grad`` None. An input that already
    requires grad (an embedding's output) goes through ``view_as`` so the hook sees the
    gradient coming from this layer only, not from other consumers of the same tensor;
    a view's backward is the identity, so upstream gradients stay bitwise unchanged.
    """
    probe = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
    probe.register_hook(on_grad)
    return probe


class Probe:
    """Common part of the recurrent probes: the on/off switch and the error policy."""

    kind = "probe"

    def __init__(self, name: str, module: nn.Module, due: Callable[[], bool]) -> None:
        self.name = name
        self.family = _family(module) or "RNN"
        #: What the core's remedies need to know: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        self.kind = self.family.lower() if self.family != "RNN" else f"rnn_{getattr(module, 'nonlinearity', 'tanh')}"
        self._module = weakref.ref(module)
        self._due = due
        self.enabled = True
        self._armed = True

    def fail(self, what: str, exc: BaseException) -> None:
        """Log once at ERROR and switch this probe off (training goes on)."""
        if self.enabled:
            self.enabled = False
            logger.error(
                "gradwatch: %s of layer %r failed (%s: %s); it is disabled for the rest of "
                "this run, training is not affected.",
                what,
                self.name,
                type(exc).__name__,
                exc,
            )

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook (with_kwargs): probe the input on profiled steps."""
        raise NotImplementedError

    def take_temporal(self) -> Tensor | None:
        """Squared per-timestep norms gathered since the last call (then reset)."""
        raise NotImplementedError

    def take_propagation(self) -> tuple[tuple[str, ...], Tensor] | None:
        """This profiled step's propagation gains: (recurrence names, an (R, T) tensor of
        gains over j = 0 .. T-1 steps back), or None when not measured."""
        return None

    def active(self) -> bool:
        """Probe this forward call? Only with grad enabled and on a profiled step.

        Activation checkpointing recomputes the forward during backward and insists the
        recomputation saves exactly the tensors the first forward saved, so the input
        transformation must be the same both times: the decision uses ``_armed``, which
        changes only between steps, never ``enabled``, which a failure may clear
        mid-backward.
        """
        return self._armed and torch.is_grad_enabled() and self._due()

    def rearm(self) -> None:
        """At a step boundary: a probe that failed stays off from now on."""
        self._armed = self.enabled


class SequenceProbe(Probe):
    """Probe for ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (whole sequences per call)."""

    kind = "sequence"

    def __init__(self, name: str, module: nn.RNNBase, due: Callable[[], bool]) -> None:
        super().__init__(name, module, due)
        self.batch_first = bool(module.batch_first)
        self.gates = GATES[self.family]
        self._sq: Tensor | None = None  # accumulated per-timestep squared norms
        self._gate_stats: Tensor | None = None
        self._hx: Any = None
        # Gates can be recomputed from input and output only when the output is layer 0's.
        self._want_gates = self.family in ("LSTM", "GRU") and module.num_layers == 1
        self.gate_name = "forget" if self.family == "LSTM" else "update"
        self.spectral_enabled = True
        self.trackers: dict[str, SpectralTracker] = {}
        suffixes = [""] + (["_reverse"] if module.bidirectional else [])
        self.recurrent_weights = [f"weight_hh_l{k}{s}" for k in range(module.num_layers) for s in suffixes]

    # -- hooks --------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active():
            return None
        try:
            if args:
                x, rest = args[0], args[1:]
            elif "input" in kwargs:
                x, rest = kwargs["input"], ()
            else:
                return None
            hx = rest[0] if rest else kwargs.get("hx")
            if isinstance(x, PackedSequence):
                sizes = x.batch_sizes
                data = _probe_input(x.data, lambda g: self._on_grad(g, sizes))
                new_x: Any = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
            elif isinstance(x, Tensor) and x.is_floating_point():
                new_x = _probe_input(x, lambda g: self._on_grad(g, None))
            else:
                return None
            self._hx = hx if self._want_gates else None
            if args:
                return (new_x, *rest), kwargs
            kwargs = dict(kwargs)
            kwargs["input"] = new_x
            return args, kwargs
        except Exception as exc:  # noqa: BLE001 - never break the forward pass
            self.fail("the input-gradient probe", exc)
            return None

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Recompute the forget gates of a profiled single-layer LSTM forward, under no_grad.

        Done here rather than at the step so that only two numbers, not the input and
        output sequences, are kept until the step.
        """
        if not self._want_gates or not self.active():
            return
        try:
            x: Any = args[0] if args else kwargs.get("input")
            out = output[0] if isinstance(output, tuple) else output
            if type(module.weight_hh_l0).__name__ == "DTensor":
                return  # sharded weights here (FSDP2 resharded already): no gates
            hx = self._hx
            h0 = hx[0] if isinstance(hx, tuple) else hx  # LSTM: (h0, c0); GRU: h0
            w_ih: Tensor = module.weight_ih_l0  # type: ignore[assignment]
            w_hh: Tensor = module.weight_hh_l0  # type: ignore[assignment]
            b_ih: Tensor | None = module.bias_ih_l0 if module.bias else None  # type: ignore[assignment]
            b_hh: Tensor | None = module.bias_hh_l0 if module.bias else None  # type: ignore[assignment]
            if isinstance(x, PackedSequence):
                stats = packed_lstm_forget_stats(
                    x.data,
                    out.data,
                    x.batch_sizes,
                    x.sorted_indices,
                    h0,
                    w_ih,
                    w_hh,
                    b_ih,
                    b_hh,
                    n_gates=len(self.gates),
                    max_batch=GATE_SAMPLE,
                )
            else:
                stats = lstm_forget_stats(
                    x,
                    out,
                    h0,
                    w_ih,
                    w_hh,
                    b_ih,
                    b_hh,
                    self.batch_first,
                    n_gates=len(self.gates),
                    max_batch=GATE_SAMPLE,
                )
            self._gate_stats = stats
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("the forget-gate statistics", exc)
        finally:
            self._hx = None
        return

    def _on_grad(self, g: Tensor, batch_sizes: Tensor | None) -> None:
        if not self.enabled:  # closed, or failed, between forward and backward
            return
        try:
            with torch.no_grad():
                if batch_sizes is None:
                    sq = timestep_sq_norms(g, self.batch_first)
                else:
                    sq = packed_timestep_sq_norms(g, batch_sizes)
                prev = self._sq
                if prev is None:
                    self._sq = sq
                elif prev.shape == sq.shape:
                    self._sq = prev + sq
                else:  # calls of different lengths within one step: align at t = 0
                    n = max(prev.shape[0], sq.shape[0])
                    acc = torch.zeros(n, dtype=prev.dtype, device=prev.device)
                    acc[: prev.shape[0]] += prev
                    acc[: sq.shape[0]] += sq.to(prev.device)
                    self._sq = acc
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("the input-gradient probe", exc)
        return

    # -- collection at the step ---------------------------------------------------------
    def take_temporal(self) -> Tensor | None:
        """The squared per-timestep norms gathered this step (reset afterwards)."""
        sq, self._sq = self._sq, None
        self.rearm()
        return sq if self.enabled else None

    def take_gates(self) -> Tensor | None:
        """[mean gate, mean sum_t log gate_t] (LSTM forget / GRU update gate), or None."""
        got, self._gate_stats = self._gate_stats, None
        return got if self.enabled else None

    def spectral(self) -> list[tuple[str, tuple[str, ...], Tensor]]:
        """sigma_max per gate block of each recurrent weight: (weight name, one label per
        block such as "lstm.weight_hh_l0[f]", the (G,) tensor)."""
        module = self._module()
        if module is None or not self.spectral_enabled:
            return []
        out: list[tuple[str, tuple[str, ...], Tensor]] = []
        try:
            for wname in self.recurrent_weights:
                w = getattr(module, wname)
                if type(w).__name__ == "DTensor":  # FSDP2: every rank gathers the same matrix
                    w = w.full_tensor()
                tracker = self.trackers.get(wname)
                if tracker is None:
                    tracker = self.trackers[wname] = SpectralTracker(len(self.gates))
                labels = tuple(f"{self.name}.{wname}[{g}]" if g else f"{self.name}.{wname}" for g in self.gates)
                out.append((wname, labels, tracker(w)))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.spectral_enabled = False
            logger.error(
                "gradwatch: the spectral norm of layer %r failed (%s: %s); it is disabled for the rest of this run, "
                "training is not affected.",
                self.name,
                type(exc).__name__,
                exc,
            )
            return []
        return out


class CellProbe(Probe):
    """Probe for ``nn.RNNCell`` / ``nn.LSTMCell`` / ``nn.GRUCell`` driven in a Python loop.

    The calls within one optimizer step are the timesteps of the profile, in call order:
    call t's input gradient lands in slot t whichever order backward visits them.
    """

    kind = "cell"

    def __init__(self, name: str, module: nn.Module, due: Callable[[], bool]) -> None:
        super().__init__(name, module, due)
        self._slots: list[Tensor | None] = []
        # True for calls made while backward recomputes a checkpointed forward: with
        # non-reentrant checkpointing their hooks never fire, and they are not timesteps.
        self._recomputed: list[bool] = []

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active() or len(self._slots) >= MAX_CELL_STEPS:
            return None
        try:
            if args:
                x, rest = args[0], args[1:]
            elif "input" in kwargs:
                x, rest = kwargs["input"], ()
            else:
                return None
            if not isinstance(x, Tensor) or not x.is_floating_point():
                return None
            t = len(self._slots)
            self._slots.append(None)
            self._recomputed.append(not _outside_backward())
            new_x = _probe_input(x, lambda g: self._on_grad(g, t))
            if args:
                return (new_x, *rest), kwargs
            kwargs = dict(kwargs)
            kwargs["input"] = new_x
            return args, kwargs
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("the input-gradient probe", exc)
            return None

    def _on_grad(self, g: Tensor, t: int) -> None:
        if not self.enabled:
            return
        try:
            with torch.no_grad():
                sq = g.to(_profile_dtype(g)).square().sum()
                if t < len(self._slots):
                    prev = self._slots[t]
                    self._slots[t] = sq if prev is None else prev + sq
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("the input-gradient probe", exc)
        return

    def take_temporal(self) -> Tensor | None:
        slots, self._slots = self._slots, []
        recomputed, self._recomputed = self._recomputed, []
        self.rearm()
        slots = [s for s, r in zip(slots, recomputed) if s is not None or not r]
        got = [s for s in slots if s is not None]
        if not got or not self.enabled:
            return None
        zero = torch.zeros((), dtype=got[0].dtype, device=got[0].device)
        return torch.stack([s if s is not None else zero for s in slots])


def find_probes(root: nn.Module, due: Callable[[], bool]) -> list[Probe]:
    """A probe for every recurrent layer and cell anywhere under ``root``."""
    probes: list[Probe] = []
    for name, m in root.named_modules():
        if isinstance(m, (nn.RNN, nn.LSTM, nn.GRU)):
            probes.append(SequenceProbe(name or type(m).__name__.lower(), m, due))
        elif isinstance(m, (nn.RNNCell, nn.LSTMCell, nn.GRUCell)):
            probes.append(CellProbe(name or type(m).__name__.lower(), m, due))
    return probes
