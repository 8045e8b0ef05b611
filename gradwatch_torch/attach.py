"""Attach a gradwatch Monitor to a PyTorch model and its optimizer.

gradwatch measures inside ``optimizer.step()`` through a step pre-hook, so the user's loop
does not change and only real optimizer steps are measured (micro-batches of gradient
accumulation are not). Without an optimizer, ``watch.step()`` is the measuring point.

One step costs: one ``torch._foreach_norm`` per (device, dtype) group of gradients, one
concatenation of everything measured (parameter norms, and on profiled steps the
per-timestep input-gradient norms of recurrent layers, spectral norms and forget-gate
statistics) and one device-to-host copy of it. The core (``monitor.process``) turns those
numbers into the record, the events and the clipping decision; this module then acts on
the decision (multiply the gradients, or drop them so the optimizer step is a no-op).

``torch.amp.GradScaler``: ``scaler.step(optimizer)`` unscales before calling
``optimizer.step()``, so gradwatch sees and clips unscaled gradients. A step the scaler
skips (it found Inf/NaN in the scaled gradients) never calls ``optimizer.step()``; gradwatch
does not see it, does not count it, and the scaler's own backoff handles it.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.handles import HandleGroup
from gradwatch_torch._recurrent import CellProbe, Probe, SequenceProbe, find_probes
from gradwatch_torch._tensors import GradGroups, agc_factors, apply_agc_, scale_grads_

if TYPE_CHECKING:  # pragma: no cover
    from gradwatch.records import StepRecord

__all__ = ["TorchAttachment", "attach", "unwrap_model"]

logger = logging.getLogger("gradwatch")

#: Models currently watched (the unwrapped module). Weak: a Watch never keeps a model alive.
_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

_STATE_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose ``named_parameters()`` names the user knows.

    ``DistributedDataParallel`` / ``DataParallel`` keep it in ``.module``;
    ``torch.compile`` in ``._orig_mod``. Their own names would carry a ``module.`` or
    ``_orig_mod.`` prefix the user never wrote.
    """
    seen = 0
    while seen < 8:
        seen += 1
        name = type(model).__name__
        if name in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _check_supported(model: nn.Module, root: nn.Module) -> None:
    """Refuse sharded models: their local gradients are shards, so local norms are wrong."""
    for m in (model, *root.modules()):
        cls = type(m).__name__
        if cls == "FullyShardedDataParallel" or cls.startswith("FSDP"):
            raise GradwatchError(
                f"gradwatch does not support FSDP yet: module {cls!r} is sharded, so each "
                "rank holds only a shard of every gradient and local norms would be wrong. "
                "Use DistributedDataParallel, or watch without FSDP."
            )
    for name, p in root.named_parameters():
        if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":
            raise GradwatchError(
                f"gradwatch does not support FSDP (fully_shard) / DTensor parameters yet: "
                f"parameter {name!r} is a DTensor, so its local gradient is a shard and the "
                "global norm would need an all-reduce gradwatch does not do yet."
            )


def _owner(name: str) -> str:
    """The module a parameter belongs to: 'encoder.lstm.weight_hh_l0' -> 'encoder.lstm'."""
    layer, _, _ = name.rpartition(".")
    return layer or name


class TorchAttachment:
    """The PyTorch side of a Watch: hooks, on-device measurement, clipping, skipping.

    Holds the parameters (tensors) but only a weak reference to the model, so dropping
    the model frees it even if the Watch lives on.
    """

    backend = "torch"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, monitor: Any) -> None:
        root = unwrap_model(model)
        _check_supported(model, root)
        if root in _WATCHED:
            raise GradwatchError(
                f"This {type(root).__name__} is already watched by gradwatch. Close the "
                "first watch (watch.close(), or use `with gradwatch.watch(...)`) before "
                "watching it again."
            )
        named = [(n, p) for n, p in root.named_parameters() if p.requires_grad]
        if not named:
            raise GradwatchError(
                f"{type(root).__name__} has no parameter that requires grad; there is no "
                "gradient for gradwatch to watch."
            )
        self._monitor = monitor
        self._model = weakref.ref(root)
        self.names = [n for n, _ in named]
        self.layers = [_owner(n) for n in self.names]
        self._groups = GradGroups([p for _, p in named])
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._handles = HandleGroup()
        self._closed = False
        self._broken = False
        self._distributed_checked = False
        self._world = 1
        self._pending_state: dict[str, Any] = {}
        policy = getattr(monitor, "policy", None)
        self._unitwise = bool(getattr(policy, "unitwise", False))
        monitor.bind(self.names, self.layers)

        # Recurrent probes: only when profiling is on at all.
        profile_every = getattr(getattr(monitor, "options", None), "profile_every", 10)
        self._probes: list[Probe] = find_probes(root, monitor.profile_due) if profile_every else []
        for probe in self._probes:
            module = probe._module()
            assert module is not None  # alive: root holds it
            self._handles.add(module.register_forward_pre_hook(probe.pre_hook, with_kwargs=True))
            if isinstance(probe, SequenceProbe) and probe._want_gates:
                self._handles.add(
                    module.register_forward_hook(probe.forward_hook, with_kwargs=True)
                )
        if optimizer is not None:
            self._handles.add(optimizer.register_step_pre_hook(self._optimizer_hook))
        _WATCHED.add(root)
        meta = getattr(monitor, "meta", None)
        if isinstance(meta, dict):  # facts for the run file's header
            meta.setdefault("backend", "torch")
            meta.setdefault("torch", torch.__version__)
            meta.setdefault("recurrent_layers", [p.name for p in self._probes])
        self._check_distributed()

    # -- Attachment protocol --------------------------------------------------------------
    def step(self) -> StepRecord | None:
        """Measure now (a watch without optimizer: after backward, before optimizer.step())."""
        if self._closed:
            raise GradwatchError("This watch is closed; watch.step() has nothing to measure.")
        if self._optimizer is not None:
            raise GradwatchError(
                "This watch runs inside optimizer.step() already (it was given the "
                "optimizer); calling watch.step() too would measure the step twice."
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
        except Exception:  # a hook whose owner is already gone: nothing left to remove
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
        return {"version": _STATE_VERSION, "spectral": spectral}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from gradwatch_torch._tensors import SpectralTracker

        spectral = dict(state.get("spectral", {}) or {})
        for probe in self._probes:
            if not isinstance(probe, SequenceProbe):
                continue
            module = probe._module()
            for wname in probe.recurrent_weights:
                key = f"{probe.name}.{wname}"
                if key in spectral and module is not None:
                    tracker = SpectralTracker(len(probe.gates))
                    tracker.load_state_dict(spectral.pop(key), getattr(module, wname).device)
                    probe.trackers[wname] = tracker
        self._pending_state = spectral  # keys for layers not present: kept, not lost

    # -- the step ---------------------------------------------------------------------------
    def _optimizer_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._measure()
        return None

    def _check_distributed(self) -> None:
        """Tell the monitor our rank once torch.distributed is up (only rank 0 writes)."""
        if self._distributed_checked:
            return
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self._world = dist.get_world_size()
            self._monitor.set_distributed(dist.get_rank(), self._world)
            self._distributed_checked = True

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
            norms = self._groups.norms(grads)
            parts: list[Tensor] = [norms]
            temporal_names, temporal_lens, temporal_parts = self._gather_temporal()
            spectral_names, spectral_parts = self._gather_spectral()
            gate_names, gate_parts = self._gather_gates()
            parts += temporal_parts + spectral_parts + gate_parts
            factors: list[Tensor | None] | None = None
            policy = getattr(self._monitor, "policy", None)
            if self._unitwise and policy is not None:
                flat = [g for gl in grads for g in gl]
                params = [p for grp in self._groups.groups for p in grp.params]
                factors, clipped_sq = agc_factors(
                    params, flat, float(policy.clip_factor), float(policy.eps)
                )
                parts.append(clipped_sq)
            dtype, device = self._groups.stat_dtype, self._groups.device
            # The single device-to-host copy of the step.
            host = (
                torch.cat([p.reshape(-1).to(device=device, dtype=dtype) for p in parts])
                .cpu()
                .numpy()
                .astype(np.float64)
            )
            n = len(self._groups)
            sq_norms = host[:n] ** 2
            pos = n
            temporal: dict[str, np.ndarray] = {}
            for name, length in zip(temporal_names, temporal_lens):
                temporal[name] = host[pos : pos + length]
                pos += length
            spectral: dict[str, float] = {}
            for name in spectral_names:
                spectral[name] = float(host[pos])
                pos += 1
            gates: dict[str, Any] = {}
            if gate_names:
                from gradwatch.records import GateStats

                for name, kind in gate_names:
                    gates[name] = GateStats(kind, float(host[pos]), float(host[pos + 1]))
                    pos += 2
            kwargs: dict[str, Any] = {}
            if temporal:
                kwargs["temporal"] = temporal
            if spectral:
                kwargs["spectral"] = spectral
            if gates:
                kwargs["gates"] = gates
            if factors is not None:
                kwargs["clipped_sq_norms"] = host[pos : pos + n]
        except Exception as exc:
            self._break(exc)
            return None

        try:
            record = self._monitor.process(sq_norms, **kwargs)
        except NonFiniteGradientError:
            raise  # on_nonfinite="raise": nothing has been changed yet
        except Exception as exc:
            self._break(exc)
            return None

        try:
            if record is None:
                return None
            if record.skipped:
                self._drop_grads()
            elif record.clip is not None and record.clip.scale != 1.0:
                if factors is not None:
                    flat = [g for gl in grads for g in gl]
                    apply_agc_(flat, factors)
                else:
                    scale_grads_(self._groups.present_grads(), float(record.clip.scale))
        except Exception as exc:
            self._break(exc)
        return record

    def _gather_temporal(self) -> tuple[list[str], list[int], list[Tensor]]:
        """Per-timestep norms gathered by the probes this step, as device tensors.

        Under DDP each rank saw its own slice of the batch; the squared norms are summed
        over ranks (and divided by world**2, since DDP averages the ranks' losses) so that
        every rank reports the same profile, that of the global batch.
        """
        names: list[str] = []
        lens: list[int] = []
        sqs: list[Tensor] = []
        for probe in self._probes:
            sq = probe.take_temporal()
            if sq is not None and sq.numel() > 0:
                names.append(probe.name)
                lens.append(int(sq.shape[0]))
                sqs.append(sq)
        if not sqs:
            return [], [], []
        if self._world > 1:
            sqs = self._allreduce_profiles(names, lens, sqs)
            if not sqs:
                return [], [], []
        return names, lens, [s.clamp(min=0).sqrt() for s in sqs]

    def _allreduce_profiles(self, names: list[str], lens: list[int], sqs: list[Tensor]) -> list[Tensor]:
        dist = torch.distributed
        try:
            device = sqs[0].device
            # Every rank must hold the same layout before a SUM makes sense (sequence
            # lengths can differ between ranks): compare with one MAX over [L, -L].
            total = sum(lens)
            meta = torch.tensor([total, len(lens), -total, -len(lens)], dtype=torch.float64, device=device)
            dist.all_reduce(meta, op=dist.ReduceOp.MAX)
            if meta[0].item() != -meta[2].item() or meta[1].item() != -meta[3].item():
                return []
            flat = torch.cat([s.to(device=device, dtype=torch.float64) for s in sqs])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat = flat / float(self._world) ** 2
            return list(torch.split(flat, lens))
        except Exception as exc:
            logger.error(
                "gradwatch: combining the per-timestep profiles across ranks failed (%s: %s); "
                "profiles are local to each rank from now on.",
                type(exc).__name__,
                exc,
            )
            self._world = 1
            return sqs

    def _gather_spectral(self) -> tuple[list[str], list[Tensor]]:
        names: list[str] = []
        values: list[Tensor] = []
        if not self._probes or not self._profiled_step():
            return names, values
        for probe in self._probes:
            if isinstance(probe, SequenceProbe):
                n, v = probe.spectral()
                names += n
                values += v
        return names, values

    def _gather_gates(self) -> tuple[list[tuple[str, str]], list[Tensor]]:
        names: list[tuple[str, str]] = []
        values: list[Tensor] = []
        for probe in self._probes:
            if isinstance(probe, SequenceProbe):
                g = probe.take_gates()
                if g is not None:
                    names.append((probe.name, probe.gate_name))
                    values.append(g)
        return names, values

    def _profiled_step(self) -> bool:
        try:
            return bool(self._monitor.profile_due())
        except Exception:
            return False

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
            logger.error(
                "gradwatch: measuring the gradients failed (%s: %s); gradwatch stops measuring "
                "this model, training goes on unchanged. Please report this as a bug.",
                type(exc).__name__,
                exc,
                exc_info=exc,
            )


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None, monitor: Any) -> TorchAttachment:
    """Attach ``monitor`` to ``model`` (and ``optimizer``); see :class:`TorchAttachment`."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradwatchError(
            f"optimizer must be a torch.optim.Optimizer or None; received "
            f"{type(optimizer).__name__}. Without an optimizer, call watch.step() after "
            "backward() and before optimizer.step()."
        )
    return TorchAttachment(model, optimizer, monitor)
