"""Through-time probes for recurrent layers: per-timestep input gradients (sensitivity),
propagation through the recurrence and gate statistics (a replay of the probed
sequences), spectral norms of the recurrent weights.

Each probe is a pair of module hooks plus, on profiled steps only, one tensor hook on the
layer's input. Everything a probe measures stays on the device until the step's single
host copy (:class:`gradwatch_torch.attach.TorchAttachment` gathers it). Each measurement
fails on its own: a bug in one logs once at ERROR on the ``gradwatch`` logger, naming the
layer and the measurement, and switches that measurement off; the others go on, and
training is never affected.

The replay (:mod:`gradwatch_torch._trajectory`, :mod:`gradwatch_torch._replay`) runs on
the first call of the layer in a profiled step, within a cost share: one replay of a
large stacked layer can cost most of a training step, so it runs on every n-th profiled
step only, n the smallest that keeps it under ``REPLAY_SHARE`` of the profiled steps'
time or, with spaced profiles, ``REPLAY_SHARE_OF_TRAINING`` of all steps (n = 1 for small
layers; see :func:`~gradwatch_torch._probing.replay_every`). The choice depends only on
shapes and step numbers, so a repeated or resumed run measures on the same steps.

Copies of a watched model (``copy.deepcopy``, ``pickle``, ``torch.save(model)``,
``AveragedModel``) leave these hooks out (see :class:`gradwatch_torch._probing.CleanCopies`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradwatch_torch._gates import module_gates
from gradwatch_torch._probing import (
    REPLAY_FREE,
    REPLAY_SHARE,
    CleanCopies,
    Hook,
    ProbeContext,
    dense_parameter_count,
    one_thread,
    outside_backward,
    probe_input,
    replay_every,
    split_call,
    tolerance,
    with_input,
)
from gradwatch.through_time.plan import seed_for
from gradwatch_torch._replay import Replayed, replay
from gradwatch_torch._tensors import SpectralTracker, packed_timestep_sq_norms, timestep_sq_norms
from gradwatch_torch._trajectory import PROBED, kind_of, replay_flops, sequence_trajectories

__all__ = [
    "GATES",
    "REPLAY_FREE",
    "REPLAY_SHARE",
    "Probe",
    "ProbeContext",
    "SequenceProbe",
    "dense_parameter_count",
    "find_probes",
    "install",
    "one_thread",
    "replay_every",
    "tolerance",
]

logger = logging.getLogger("gradwatch")

#: Gate blocks of ``weight_hh`` in PyTorch's storage order.
GATES: dict[str, tuple[str, ...]] = {"lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n"), "rnn_tanh": ("",), "rnn_relu": ("",)}

#: Cell calls remembered within one step for the input-gradient profile; a cell driven
#: for longer without an optimizer step (an evaluation loop with grad enabled, say) stops
#: adding timesteps, so memory stays bounded.
MAX_CELL_STEPS = 100_000
#: Cell calls recorded for the replay within one step (their probed rows are copied).
MAX_CELL_REPLAY = 4096

#: Replays of one layer within one optimizer step at most (calls before the trained one:
#: an evaluation forward with grad enabled, say).
MAX_REPLAYS = 3


def _on_backward(outputs: Any, flag: list[bool]) -> None:
    """Set ``flag[0]`` when backward reaches any tensor in ``outputs`` (nested tuples,
    PackedSequences): the call was part of a training step."""
    def mark(_: Tensor) -> None:
        flag[0] = True

    stack = [outputs]
    while stack:
        o = stack.pop()
        if isinstance(o, PackedSequence):
            o = o.data
        if isinstance(o, (tuple, list)):
            stack.extend(o)
        elif isinstance(o, Tensor) and o.requires_grad:
            o.register_hook(mark)


_MEASURES = {
    "profile": "input-gradient profile",
    "replay": "propagation replay (propagation and gate statistics)",
    "spectral": "spectral norms",
}


class Probe:
    """Common part of the recurrent probes: switches, schedule, error policy, results."""

    def __init__(self, name: str, module: nn.Module, ctx: ProbeContext) -> None:
        self.name = name
        #: What the core's remedies need to know: "lstm", "gru", "rnn_tanh" or "rnn_relu".
        self.kind = kind_of(module)
        self.gates = GATES[self.kind]
        self.gate_name = "forget" if self.kind == "lstm" else "update"
        self._module = weakref.ref(module)
        self._ctx = ctx
        self._off: set[str] = set()
        self._armed = True
        self._replays = 0  # replays started this step
        #: This step's replays, each with the flag its call's backward sets: only a call
        #: that training differentiated through is measured (an evaluation forward with
        #: grad enabled between two steps is replayed, then left out).
        self._calls: list[tuple[tuple[tuple[str, ...], Tensor, Tensor, Tensor | None, Tensor | None, float], list[bool]]] = []
        self._gates: Tensor | None = None
        self._propagation: tuple[tuple[str, ...], Tensor, Tensor] | None = None
        self._generator = torch.Generator(device="cpu")
        self.trackers: dict[str, SpectralTracker] = {}
        self.recurrent_weights: list[str] = []

    # -- switches -----------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return "closed" not in self._off

    @enabled.setter
    def enabled(self, on: bool) -> None:
        if on:
            self._off.discard("closed")
        else:
            self._off.add("closed")

    def on(self, measure: str) -> bool:
        return measure not in self._off and "closed" not in self._off

    def fail(self, measure: str, exc: BaseException | str) -> None:
        """Log once at ERROR and switch ``measure`` off (the others and training go on)."""
        if measure in self._off or "closed" in self._off:
            return
        self._off.add(measure)
        why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        logger.error(
            "gradwatch: the %s of recurrent layer %r failed (%s); that measurement is disabled for the rest of "
            "this run, the layer's other measurements go on and training is not affected.",
            _MEASURES[measure],
            self.name,
            why,
        )

    def active(self) -> bool:
        """Probe this forward call's input? Only with grad enabled and on a profiled step.

        Activation checkpointing recomputes the forward during backward and insists the
        recomputation saves exactly the tensors the first forward saved, so the input
        transformation must be the same both times: the decision uses ``_armed``, which
        changes only between steps, never the switches a failure may flip mid-backward.
        """
        return self._armed and torch.is_grad_enabled() and self._ctx.due()

    def rearm(self) -> None:
        """At a step boundary: a profile that failed stays off from now on."""
        self._armed = self.on("profile")
        self._replays = 0  # (this step's replays are settled, and dropped, when taken)

    def _replay_due(self, flops: float, tokens: int) -> bool:
        if not self.on("replay") or self._replays >= MAX_REPLAYS or not outside_backward():
            return False
        if any(flag[0] for _, flag in self._calls):
            return False  # a call of this step was trained already: that is the one measured
        step = self._ctx.step()
        if step == 1:
            return True
        n = self._ctx.replay_every or replay_every(flops, self._ctx.model_params, tokens, self._ctx.every)
        return (step // max(self._ctx.every, 1)) % n == 0

    # -- the replay's results -----------------------------------------------------------
    def _store(self, labels: tuple[str, ...], results: list[Replayed], exact: bool, tol: float, outputs: Any = None) -> None:
        """Keep one call's replay; it counts only once backward reaches one of ``outputs``
        (the call's output tensors; None: counted at once)."""
        gains = torch.stack([r.gains for r in results])
        top = torch.stack([r.max_gains for r in results])
        gates = module_gates(results)
        dev = torch.stack([r.deviation for r in results]).max() if exact else None
        flag = [outputs is None]
        self._calls.append(((labels, gains, top, gates, dev, tol), flag))
        if outputs is not None:
            _on_backward(outputs, flag)

    def _settle(self) -> None:
        """Check this step's trained replay against the layer's own output (once)."""
        calls, self._calls = self._calls, []
        res = next((r for r, flag in calls if flag[0]), None)
        if res is None or not self.on("replay"):
            return
        labels, gains, top, gates, dev, tol = res
        if dev is not None:
            worst = float(dev)  # the only host read of the replay, on replay steps only
            if not worst <= tol:
                self.fail(
                    "replay",
                    f"the replayed states differ from the layer's own output by {worst:.3g} of its largest value "
                    f"(tolerance {tol:g}); is the layer's forward modified, or its weights changed inside forward?",
                )
                return
        self._propagation = (labels, gains, top)
        self._gates = gates

    def take_propagation(self) -> tuple[tuple[str, ...], Tensor, Tensor] | None:
        """This step's propagation: (recurrence names, (R, T) RMS gains, (R, T) largest
        singular values, over j = 0 .. T-1 steps back), or None when not measured this step."""
        self._settle()
        got, self._propagation = self._propagation, None
        return got if self.on("replay") else None

    def take_gates(self) -> Tensor | None:
        """[mean gate, mean sum_t log gate] (LSTM forget / GRU update gate) of this step's
        replay, or None."""
        self._settle()
        got, self._gates = self._gates, None
        return got if self.on("replay") and self.kind in ("lstm", "gru") else None

    def _seeded(self) -> torch.Generator:
        return self._generator.manual_seed(seed_for(self.name, self._ctx.step()))

    # -- subclasses -----------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        raise NotImplementedError

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        raise NotImplementedError

    def take_temporal(self) -> Tensor | None:
        raise NotImplementedError

    def spectral(self) -> list[tuple[str, tuple[str, ...], Tensor]]:
        """sigma_max per gate block of each recurrent weight: (weight name, one label per
        block such as "lstm.weight_hh_l0[f]", the (G,) tensor)."""
        module = self._module()
        if module is None or not self.on("spectral"):
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
                with one_thread(w.device.type):  # small products: one thread is faster (see one_thread)
                    out.append((wname, labels, tracker(w)))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("spectral", exc)
            return []
        return out

    def close(self) -> None:
        self.enabled = False
        self._calls = []
        self._gates = None
        self._propagation = None


class SequenceProbe(Probe):
    """Probe for ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (whole sequences per call)."""

    def __init__(self, name: str, module: nn.RNNBase, ctx: ProbeContext) -> None:
        super().__init__(name, module, ctx)
        self.batch_first = bool(module.batch_first)
        self._sq: Tensor | None = None  # accumulated per-timestep squared norms
        self._capture: tuple[Any, Any, Tensor | None] | None = None
        suffixes = [""] + (["_reverse"] if module.bidirectional else [])
        self.recurrent_weights = [f"weight_hh_l{k}{s}" for k in range(module.num_layers) for s in suffixes]

    def _flops(self, module: nn.RNNBase, x: Any) -> tuple[float, int]:
        if isinstance(x, PackedSequence):
            batch, steps = int(x.batch_sizes[0]), int(x.batch_sizes.shape[0])
        elif x.dim() == 2:
            batch, steps = 1, int(x.shape[0])
        else:
            batch, steps = int(x.shape[0 if self.batch_first else 1]), int(x.shape[1 if self.batch_first else 0])
        proj = getattr(module, "proj_size", 0) or module.hidden_size
        flops = replay_flops(
            self.kind, module.num_layers, 2 if module.bidirectional else 1, module.input_size, module.hidden_size, proj,
            min(batch, PROBED), steps,
        )
        return flops, batch * steps

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (torch.is_grad_enabled() and self._ctx.due()) or not self.enabled:
            return None
        split = split_call(args, kwargs)
        if split is None:
            return None
        x, hx, by_keyword = split
        if not isinstance(x, PackedSequence) and not (isinstance(x, Tensor) and x.is_floating_point()):
            return None
        try:
            if self._capture is None and self._replay_due(*self._flops(module, x)):  # type: ignore[arg-type]
                self._replays += 1
                rnn: Any = module
                dropout = rnn.training and rnn.dropout > 0 and rnn.num_layers > 1
                data = x.data if isinstance(x, PackedSequence) else x
                rng = torch.get_rng_state() if dropout and data.device.type == "cpu" else None
                self._capture = (x, hx, rng)
        except Exception as exc:  # noqa: BLE001 - never break the forward pass
            self.fail("replay", exc)
        if not self.active():
            return None
        try:
            if isinstance(x, PackedSequence):
                sizes = x.batch_sizes
                data = probe_input(x.data, lambda g: self._on_grad(g, sizes))
                new_x: Any = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
            else:
                new_x = probe_input(x, lambda g: self._on_grad(g, None))
            return with_input(args, kwargs, new_x, by_keyword)
        except Exception as exc:  # noqa: BLE001 - never break the forward pass
            self.fail("profile", exc)
            return None

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Replay the probed sequences of this call (the first of a profiled step).

        Done here, under no_grad and without autocast, while the weights are those of
        the forward (FSDP2 reshards them right after: this hook is prepended).
        """
        cap, self._capture = self._capture, None
        if cap is None or not self.on("replay"):
            return
        try:
            rnn: Any = module
            if type(rnn.weight_hh_l0).__name__ == "DTensor":
                return  # sharded weights here (FSDP2 resharded already): no replay
            x, hx, rng = cap
            data = x.data if isinstance(x, PackedSequence) else x
            out = output[0]
            tol = tolerance((out.data if isinstance(out, PackedSequence) else out).dtype, data.device.type)
            with torch.no_grad(), torch.autocast(data.device.type, enabled=False):
                trajectories, exact = sequence_trajectories(rnn, x, hx, output, rng)
                gen = self._seeded()
                results = [replay(tr, gen) for tr in trajectories]
            self._store(tuple(r.name for r in results), results, exact, tol, outputs=output)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("replay", exc)

    def _on_grad(self, g: Tensor, batch_sizes: Tensor | None) -> None:
        if not self.on("profile"):  # closed, or failed, between forward and backward
            return
        try:
            with torch.no_grad():
                sq = timestep_sq_norms(g, self.batch_first) if batch_sizes is None else packed_timestep_sq_norms(g, batch_sizes)
                self._sq = add_profiles(self._sq, sq)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self.fail("profile", exc)

    def take_temporal(self) -> Tensor | None:
        """The squared per-timestep norms gathered this step (reset afterwards)."""
        sq, self._sq = self._sq, None
        self._capture = None
        self.rearm()
        return sq if self.on("profile") else None


def add_profiles(prev: Tensor | None, sq: Tensor) -> Tensor:
    """One step's per-timestep squared norms plus another call's: calls of different
    lengths within one step are aligned at t = 0."""
    if prev is None:
        return sq
    if prev.shape == sq.shape:
        return prev + sq
    acc = torch.zeros(max(prev.shape[0], sq.shape[0]), dtype=prev.dtype, device=prev.device)
    acc[: prev.shape[0]] += prev
    acc[: sq.shape[0]] += sq.to(prev.device)
    return acc


def find_probes(root: nn.Module, ctx: ProbeContext) -> list[Probe]:
    """A probe for every recurrent layer and cell anywhere under ``root``."""
    from gradwatch_torch._cells import CellProbe

    probes: list[Probe] = []
    for name, m in root.named_modules():
        if isinstance(m, (nn.RNN, nn.LSTM, nn.GRU)):
            probes.append(SequenceProbe(name or type(m).__name__.lower(), m, ctx))
        elif isinstance(m, (nn.RNNCell, nn.LSTMCell, nn.GRUCell)):
            probes.append(CellProbe(name or type(m).__name__.lower(), m, ctx))
    from gradwatch_torch.recurrences import find_modern_probes

    probes += find_modern_probes(root, ctx, skip={id(p._module()) for p in probes})
    return probes


def install(probe: Probe, module: nn.Module) -> list[Any]:
    """Register the probe's hooks on its module and leave them out of the module's copies
    (:class:`~gradwatch_torch._probing.CleanCopies`); returns what undoes it all. The
    forward hook is prepended so it runs before FSDP2 reshards the weights."""
    handles = [
        module.register_forward_pre_hook(Hook(probe, "pre_hook"), with_kwargs=True),
        module.register_forward_hook(Hook(probe, "forward_hook"), with_kwargs=True, prepend=True),
    ]
    return [*handles, CleanCopies.add(module, [h.id for h in handles])]
