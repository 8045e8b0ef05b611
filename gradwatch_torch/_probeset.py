"""The recurrent probes of one PyTorch watch, and what they add to a step's host copy.

Each probed recurrent layer gathers on the device during forward and backward (its
per-timestep profile, gate statistics, spectral norms, propagation gains; see
:mod:`gradwatch_torch._recurrent`). :meth:`ProbeSet.gather` adds what they hold to the
segments of the step's one copy, combined across ranks under DDP / FSDP, each measurement
on its own: one that fails turns off alone (:meth:`ProbeSet.optional`), with a message
naming it, and the norms, clipping and checks go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from gradwatch import HandleGroup, Segment
from gradwatch.through_time.families import GATE_PROJECTIONS
from gradwatch_torch import _distributed
from gradwatch_torch._recurrent import Probe, ProbeContext, SequenceProbe, find_probes, install
from gradwatch_torch._segments import gates_of, propagation_of, spectral_of, temporal_of
from gradwatch_torch._spectral import SpectralTracker
from gradwatch_torch._sweeps import combine_ranks

__all__ = ["ProbeSet"]

logger = logging.getLogger("gradwatch")
_T = TypeVar("_T")

Parts = dict[tuple[str, str], Tensor]


class ProbeSet:
    """The probes (``probes``, a list kept in place), the optional measurements turned off
    after a failure, and the spectral state of layers not (yet) present."""

    def __init__(self, ctx: ProbeContext | None, meta: dict[str, Any], next_step: Callable[[], int]) -> None:
        self._ctx = ctx
        self._meta = meta
        self._next_step = next_step
        self.probes: list[Probe] = []
        self._off: set[tuple[str, str]] = set()
        self._pending_state: dict[str, Any] = {}

    def add(self, root: nn.Module, handles: HandleGroup) -> list[Probe]:
        """Probe every recurrent layer of ``root`` not probed yet (at attach, and when the
        parameter set changes: a layer added after ``watch()`` is profiled too)."""
        if self._ctx is None:
            return []
        have = {id(p._module()) for p in self.probes}
        new = [p for p in find_probes(root, self._ctx) if id(p._module()) not in have]
        for probe in new:
            module = probe._module()
            if module is None:  # cannot happen while root is alive; keeps the type checker honest
                continue
            for handle in install(probe, module):  # hooks that copies of the model leave out (_probing.CleanCopies)
                handles.add(handle)
        self.probes.extend(new)
        return new

    def describe(self, probes: list[Probe]) -> None:
        """What the remedies need to know of each probed layer (the run file's header too)."""
        meta = self._meta
        for p in probes:
            if getattr(p, "speculative", False):  # a user module not yet seen driven in a loop
                continue
            meta["recurrent_layers"][p.name] = p.kind
            module = p._module()
            bias = forget_bias(module) if module is not None else None
            if bias is not None:
                meta["forget_bias"][p.name] = bias
            proj = GATE_PROJECTIONS.get(p.kind)
            gate = getattr(module, proj, None) if proj is not None else None
            if isinstance(gate, nn.Linear) and gate.bias is None:
                meta.setdefault("no_gate_bias", {})[p.name] = proj

    def forget_bias_now(self, layer: str, recurrence: str) -> float | None:
        """The live fact ``forget_bias`` (:attr:`gradwatch.view.MonitorView.live`): the
        alerted recurrence's forget-gate bias as it is now, not as it was at attach."""
        for p in self.probes:
            if p.name == layer:
                module = p._module()
                return forget_bias_of(module, recurrence) if module is not None else None
        return None

    def optional(self, key: tuple[str, str], what: str, fn: Callable[..., _T], *args: Any, goes_on: str = "") -> _T | None:
        """Run one optional measurement; if it fails, turn off it alone and say which."""
        if key in self._off:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._off.add(key)
            logger.error(
                "gradwatch: %s failed at step %d (%s: %s); this measurement is off for the rest of this run. "
                "%s; training is not affected.",
                what,
                self._next_step(),
                type(exc).__name__,
                exc,
                goes_on or "The gradient norms, clipping, checks and the other measurements go on",
            )
            return None

    def gather(self, segments: list[Segment], parts: Parts, profiled: bool, world: int, device: torch.device) -> int:
        """Add what the probes gathered this step; returns the world size to use from now on
        (1 once combining across ranks failed)."""
        names: list[str] = []
        sqs: list[Tensor] = []
        gate_probes: list[Probe] = []
        gate_values: list[Tensor] = []
        for probe in self.probes:
            what = f"the per-timestep profile of recurrent layer {probe.name!r}"
            sq = self.optional((probe.name, "temporal"), what, temporal_of, probe)
            if sq is not None and sq.numel() > 0:
                names.append(probe.name)
                sqs.append(sq)
            what = f"the {probe.gate_name}-gate statistics of recurrent layer {probe.name!r}"
            g = self.optional((probe.name, "gates"), what, gates_of, probe)
            if g is not None:
                gate_probes.append(probe)
                gate_values.append(g)
        if world > 1 and profiled:
            # Every rank takes this branch on the same steps (the step counter is shared),
            # so the collectives never wait for a rank that skipped them.
            got = _distributed.allreduce_profiles(world, device, [int(s.shape[0]) for s in sqs], sqs, gate_values)
            if got is None:
                world = 1
            else:
                sqs, gate_values = got
                names = names if sqs else []
                gate_probes = gate_probes if gate_values else []
        for name, sq in zip(names, sqs):
            segments.append(Segment("temporal", int(sq.shape[0]), key=name))
            parts[("temporal", name)] = sq
        if profiled:
            self._spectral(segments, parts)
        for probe, g in zip(gate_probes, gate_values):
            segments.append(Segment("gates", 2, key=probe.name, labels=(probe.gate_name,)))
            parts[("gates", probe.name)] = g
        if profiled:
            world = self._propagation(segments, parts, world, device)
        return world

    def _spectral(self, segments: list[Segment], parts: Parts) -> None:
        for probe in self.probes:
            if isinstance(probe, SequenceProbe):
                what = f"the spectral norms of recurrent layer {probe.name!r}"
                got_s = self.optional((probe.name, "spectral"), what, spectral_of, probe)
                for wname, labels, sigma in got_s or []:
                    key = f"{probe.name}.{wname}"
                    segments.append(Segment("spectral", len(labels), key=key, labels=labels))
                    parts[("spectral", key)] = sigma

    def _propagation(self, segments: list[Segment], parts: Parts, world: int, device: torch.device) -> int:
        props: list[tuple[str, tuple[str, ...], Tensor, Tensor]] = []
        sizes: list[int] = []
        for probe in self.probes:
            what = f"the propagation gains of recurrent layer {probe.name!r}"
            got_p = self.optional((probe.name, "propagation"), what, propagation_of, probe)
            sizes.append(0 if got_p is None else int(got_p[1].numel()))
            if got_p is not None:
                props.append((probe.name, *got_p))
        if world > 1:  # every rank reports the same numbers, over every rank's sequences
            combined = combine_ranks(world, device, sizes, [(g, t) for _, _, g, t in props])
            if combined is None:
                world = 1
            else:
                props = [(n, labels, g, t) for (n, labels, _, _), (g, t) in zip(props, combined)] if combined else []
        for name, labels, gains, top in props:
            segments.append(Segment("propagation", int(gains.numel()), key=name, labels=labels))
            parts[("propagation", name)] = gains
            segments.append(Segment("max_gains", int(top.numel()), key=name, labels=labels))
            parts[("max_gains", name)] = top
        return world

    def stop(self) -> None:
        """The step counter stopped (gradwatch broke): stop probing too."""
        for probe in self.probes:
            probe.enabled = False
            probe.rearm()

    def close(self) -> None:
        for probe in self.probes:
            try:  # drop what it holds; close() never raises
                probe.close()
            except Exception:  # noqa: BLE001, S110 - a probe that failed already said so
                pass

    def state_dict(self) -> dict[str, Any]:
        """The power-iteration vectors, so a resumed run reports the same spectral norms."""
        spectral: dict[str, Any] = {}
        for probe in self.probes:
            if isinstance(probe, SequenceProbe):
                for wname, tracker in probe.trackers.items():
                    sd = tracker.state_dict()
                    if sd:
                        spectral[f"{probe.name}.{wname}"] = sd
        for key, sd in self._pending_state.items():
            spectral.setdefault(key, sd)
        return {"spectral": spectral}

    def load_state_dict(self, state: Any) -> None:
        spectral = dict(state.get("spectral", {}) or {})
        for probe in self.probes:
            module = probe._module()
            if not isinstance(probe, SequenceProbe) or module is None:
                continue
            for wname in probe.recurrent_weights:
                key = f"{probe.name}.{wname}"
                if key in spectral:
                    tracker = SpectralTracker(len(probe.gates))
                    tracker.load_state_dict(spectral.pop(key), getattr(module, wname).device)
                    probe.trackers[wname] = tracker
        self._pending_state = spectral  # keys for layers not present: kept, not lost


def forget_bias_of(module: nn.Module, recurrence: str) -> float | None:
    """The mean forget-gate bias (b_ih + b_hh of the f block) of one recurrence of an
    LSTM ("l1", "l0_reverse"; an ``nn.LSTMCell`` has "l0"), read now; None for other
    layers or recurrences. One small host read: called at attach (:func:`forget_bias`) and
    when an alert is written, never on the training step."""
    if not isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return None
    suffix = "" if isinstance(module, nn.LSTMCell) else f"_{recurrence}"
    if isinstance(module, nn.LSTMCell) and recurrence != "l0":
        return None
    b_ih, b_hh = getattr(module, f"bias_ih{suffix}", None), getattr(module, f"bias_hh{suffix}", None)
    if b_ih is None:
        return 0.0 if not module.bias else None  # bias=False: the gate starts at sigmoid(0)
    hidden = module.hidden_size
    with torch.no_grad():
        b = b_ih.detach()[hidden : 2 * hidden].float()
        if b_hh is not None:
            b = b + b_hh.detach()[hidden : 2 * hidden].float()
        return float(b.mean())


def forget_bias(module: nn.Module) -> float | None:
    """The smallest mean forget-gate bias over an LSTM's recurrences (:func:`forget_bias_of`
    of each), for the run file's header and the remedies' fallback (None for other layers)."""
    if isinstance(module, nn.LSTMCell):
        return forget_bias_of(module, "l0")
    if not isinstance(module, nn.LSTM):
        return None
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    means = [forget_bias_of(module, f"l{k}{s}") for k in range(module.num_layers) for s in suffixes]
    return min((m for m in means if m is not None), default=None)
