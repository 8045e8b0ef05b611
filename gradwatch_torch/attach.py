"""Attach a gradwatch monitor to a PyTorch model and its optimizer.

gradwatch measures inside ``optimizer.step()`` through a step pre-hook, so the user's loop
does not change and only real optimizer steps are measured (micro-batches of gradient
accumulation are not). Without an optimizer, ``watch.step()`` is the measuring point.

One step costs: one ``torch._foreach_norm`` per (device, dtype) group of gradients, one
concatenation of everything measured (parameter norms, and on profiled steps what the
recurrent probes gathered) in the core's statistics layout, and one device-to-host copy
of it. The core (``monitor.process``) turns those numbers into the record, the events and
the clipping decision; this module then acts on the decision (multiply the gradients,
or drop them so the optimizer step is a no-op).

``torch.amp.GradScaler``: ``scaler.step(optimizer)`` unscales before calling
``optimizer.step()``, so gradwatch sees and clips unscaled gradients. A step the scaler
skips (it found Inf/NaN in the scaled gradients) never calls ``optimizer.step()``; gradwatch
does not see it, does not count it, and the scaler's own backoff handles it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from gradwatch import HandleGroup, Layout, Segment, infer_layer
from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch_torch import _distributed
from gradwatch_torch._recurrent import Probe, SequenceProbe, find_probes
from gradwatch_torch._tensors import GradGroups, SpectralTracker, agc_factors, apply_agc_, scale_grads_

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch import MonitorPort, StepRecord

__all__ = ["TorchAttachment", "attach", "unwrap_model"]

logger = logging.getLogger("gradwatch")

#: Models currently watched (the unwrapped module). Weak: a Watch never keeps a model alive.
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose ``named_parameters()`` names the user knows.

    ``DistributedDataParallel`` / ``DataParallel`` keep it in ``.module``;
    ``torch.compile`` in ``._orig_mod``. Their own names would carry a ``module.`` or
    ``_orig_mod.`` prefix the user never wrote.
    """
    for _ in range(8):
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(getattr(model, "module", None), nn.Module):
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            break
    return model


def _sparse_grad_positions(root: nn.Module, named: Sequence[tuple[str, Any]]) -> list[int]:
    """Positions of parameters whose gradient is sparse (``nn.Embedding(sparse=True)``)."""
    ids = {id(m.weight) for m in root.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)}
    return [i for i, (_, p) in enumerate(named) if id(p) in ids]


def _cat(device: torch.device, dtype: torch.dtype) -> Any:
    def concat(parts: list[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1).to(device=device, dtype=dtype) for p in parts])

    return concat


class TorchAttachment:
    """The PyTorch side of a Watch: hooks, on-device measurement, clipping, skipping.

    Holds the parameters (tensors) but only a weak reference to the model, so dropping
    the model frees it even if the Watch lives on.
    """

    backend = "torch"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, monitor: MonitorPort) -> None:
        root = unwrap_model(model)
        if root in _WATCHED:
            raise GradwatchError(
                f"This {type(root).__name__} is already watched by gradwatch. Close the first watch (watch.close(), or "
                "use `with gradwatch.watch(...)`) before watching it again."
            )
        named = [(n, p) for n, p in root.named_parameters() if p.requires_grad]
        if not named:
            raise GradwatchError(f"{type(root).__name__} has no parameter that requires grad; there is no gradient for gradwatch to watch.")
        self._policy = monitor.policy
        self._unitwise = bool(getattr(self._policy, "unitwise", False))
        self._shard_group = _distributed.shard_group(model, root, named, self._unitwise)
        self._monitor = monitor
        self._model = weakref.ref(root)
        self.names = [n for n, _ in named]
        self._groups = GradGroups([p for _, p in named], local_shards=self._shard_group is not None, sparse=_sparse_grad_positions(root, named))
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._handles = HandleGroup()
        self._closed = False
        self._broken = False
        self._world = 1
        self._pending_state: dict[str, Any] = {}
        self._layouts: dict[tuple[Segment, ...], Layout] = {}
        monitor.bind(self.names, [infer_layer(n) for n in self.names])

        self._probes: list[Probe] = find_probes(root, monitor.profile_due) if monitor.options.profile_every else []
        for probe in self._probes:
            module = probe._module()
            if module is None:  # cannot happen while root is alive; keeps the type checker honest
                continue
            self._handles.add(module.register_forward_pre_hook(probe.pre_hook, with_kwargs=True))
            if isinstance(probe, SequenceProbe) and probe._want_gates:
                # prepend: run before FSDP2 reshards the weights after forward
                self._handles.add(module.register_forward_hook(probe.forward_hook, with_kwargs=True, prepend=True))
        if optimizer is not None:
            self._handles.add(optimizer.register_step_pre_hook(self._optimizer_hook))
        _WATCHED.add(root)
        meta = monitor.meta  # facts for the run file's header
        meta.setdefault("backend", "torch")
        meta.setdefault("torch", torch.__version__)
        meta.setdefault("recurrent_layers", {p.name: p.kind for p in self._probes})
        self._check_distributed()

    # -- Attachment protocol --------------------------------------------------------------
    def step(self) -> StepRecord | None:
        """Measure now (a watch without optimizer: after backward, before optimizer.step())."""
        if self._closed:
            raise GradwatchError("This watch is closed; watch.step() has nothing to measure.")
        if self._optimizer is not None:
            raise GradwatchError(
                "This watch runs inside optimizer.step() already (it was given the optimizer); calling watch.step() "
                "too would measure the step twice."
            )
        return self._measure()

    def sync(self) -> None:
        """Nothing is pending: every step's statistics reach the host in its one copy."""

    def close(self) -> None:
        """Remove every hook this attachment installed; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._handles.remove()
        except Exception:  # noqa: BLE001, S110 - a hook whose owner is gone: nothing to remove
            pass
        for probe in self._probes:
            probe.enabled = False
            probe.take_temporal()
            if isinstance(probe, SequenceProbe):
                probe.take_gates()
        root = self._model()
        if root is not None:
            _WATCHED.discard(root)

    def state_dict(self) -> dict[str, Any]:
        """The power-iteration vectors, so a resumed run reports the same spectral norms."""
        spectral: dict[str, Any] = {}
        for probe in self._probes:
            if isinstance(probe, SequenceProbe):
                for wname, tracker in probe.trackers.items():
                    sd = tracker.state_dict()
                    if sd:
                        spectral[f"{probe.name}.{wname}"] = sd
        for key, sd in self._pending_state.items():
            spectral.setdefault(key, sd)
        return {"spectral": spectral}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        spectral = dict(state.get("spectral", {}) or {})
        for probe in self._probes:
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

    # -- the step ---------------------------------------------------------------------------
    def _optimizer_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._measure()

    def _check_distributed(self) -> None:
        """Tell the monitor our rank once torch.distributed is up (only rank 0 writes)."""
        if self._world > 1:
            return
        got = _distributed.rank_and_world()
        if got is not None:
            self._world = got[1]
            self._monitor.set_distributed(*got)

    def _measure(self) -> StepRecord | None:
        """Measure, hand the numbers to the monitor, act on its decision.

        Only ``NonFiniteGradientError`` (``on_nonfinite="raise"``) may leave this method:
        any other failure is a gradwatch bug, logged once; measuring then stops and
        training carries on untouched.
        """
        if self._closed or self._broken:
            return None
        try:
            self._check_distributed()
            grads = self._groups.grads()
            segments, parts = self._gather(grads)
            factors: list[Tensor | None] | None = None
            if self._unitwise:
                flat = [g for gl in grads for g in gl]
                params = [p for grp in self._groups.groups for p in grp.params]
                factors, clipped_sq = agc_factors(params, flat, self._policy)
                segments.append(Segment("clipped_sq", len(self._groups)))
                parts[("clipped_sq", "")] = clipped_sq
            key = tuple(segments)
            layout = self._layouts.get(key)
            if layout is None:
                layout = self._layouts[key] = Layout(segments)
            # The single device-to-host copy of the step.
            host = layout.pack(parts, _cat(self._groups.device, self._groups.stat_dtype)).cpu().numpy()
            stats = layout.unpack(host)
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break(exc)
            return None

        try:
            record = self._monitor.process(stats)
        except NonFiniteGradientError:
            raise  # on_nonfinite="raise": nothing has been changed yet
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break(exc)
            return None

        try:
            if record.skipped:
                self._drop_grads()
            elif record.clip is not None and (factors is not None or record.clip.scale != 1.0):
                if factors is not None:
                    apply_agc_([g for gl in grads for g in gl], factors)
                else:
                    scale_grads_(self._groups.present_grads(), float(record.clip.scale))
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break(exc)
        return record

    def _gather(self, grads: list[list[Tensor | None]]) -> tuple[list[Segment], dict[tuple[str, str], Tensor]]:
        """This step's segments and tensors, still on the device: parameter norms, and what
        the probes gathered (combined across ranks under DDP / FSDP)."""
        norms = self._groups.norms(grads)
        if self._shard_group is not None:  # FSDP2: sum the shards' squared norms
            sq = norms.to(torch.float64).square()
            torch.distributed.all_reduce(sq, group=self._shard_group)
            norms = sq.sqrt()
        segments = [Segment("norms", len(self._groups))]
        parts: dict[tuple[str, str], Tensor] = {("norms", ""): norms}
        names: list[str] = []
        sqs: list[Tensor] = []
        gate_probes: list[SequenceProbe] = []
        gate_values: list[Tensor] = []
        for probe in self._probes:
            sq = probe.take_temporal()
            if sq is not None and sq.numel() > 0:
                names.append(probe.name)
                sqs.append(sq)
            if isinstance(probe, SequenceProbe):
                g = probe.take_gates()
                if g is not None:
                    gate_probes.append(probe)
                    gate_values.append(g)
        profiled = bool(self._probes) and self._monitor.profile_due()
        if self._world > 1 and profiled:
            # Every rank takes this branch on the same steps (the step counter is shared),
            # so the collectives never wait for a rank that skipped them.
            got = _distributed.allreduce_profiles(self._world, self._groups.device, [int(s.shape[0]) for s in sqs], sqs, gate_values)
            if got is None:
                self._world = 1
            else:
                sqs, gate_values = got
                names = names if sqs else []
                gate_probes = gate_probes if gate_values else []
        for name, sq in zip(names, sqs):
            segments.append(Segment("temporal", int(sq.shape[0]), key=name))
            parts[("temporal", name)] = sq
        if profiled:
            for probe in self._probes:
                if isinstance(probe, SequenceProbe):
                    for wname, labels, sigma in probe.spectral():
                        key = f"{probe.name}.{wname}"
                        segments.append(Segment("spectral", len(labels), key=key, labels=labels))
                        parts[("spectral", key)] = sigma
        for probe, g in zip(gate_probes, gate_values):
            segments.append(Segment("gates", 2, key=probe.name, labels=(probe.gate_name,)))
            parts[("gates", probe.name)] = g
        if profiled:
            for probe in self._probes:
                got = probe.take_propagation()
                if got is not None:
                    labels, gains = got
                    segments.append(Segment("propagation", int(gains.numel()), key=probe.name, labels=labels))
                    parts[("propagation", probe.name)] = gains
        return segments, parts

    def _drop_grads(self) -> None:
        """Make the coming optimizer step a no-op: every gradient becomes None.

        Zeroing is not enough: weight decay and momentum would still move the weights and
        Adam would still advance its state; with ``grad is None`` every built-in optimizer
        skips the parameter entirely.
        """
        for p in self._groups.params:
            p.grad = None
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            for group in opt.param_groups:
                for p in group["params"]:
                    p.grad = None

    def _break(self, exc: BaseException) -> None:
        if not self._broken:
            self._broken = True
            for probe in self._probes:  # the step counter stops: stop probing too
                probe.enabled = False
                probe.rearm()
            logger.error(
                "gradwatch: measuring the gradients failed (%s: %s); gradwatch stops measuring this model, training "
                "goes on unchanged. Please report this as a bug.",
                type(exc).__name__,
                exc,
                exc_info=exc,
            )


def attach(model: nn.Module, optimizer: object | None, monitor: MonitorPort) -> TorchAttachment:
    """Attach ``monitor`` to ``model`` (and ``optimizer``); see :class:`TorchAttachment`."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradwatchError(
            f"optimizer must be a torch.optim.Optimizer or None; received {type(optimizer).__name__}. Without an "
            "optimizer, call watch.step() after backward() and before optimizer.step()."
        )
    return TorchAttachment(model, optimizer, monitor)
