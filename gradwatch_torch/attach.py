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
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch.errors import GradwatchError, NonFiniteGradientError
from gradwatch.handles import HandleGroup
from gradwatch_torch._recurrent import Probe, SequenceProbe, find_probes
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
            model = cast(nn.Module, model.module)
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            break
    return model


def _is_dtensor(t: object) -> bool:
    # By name: importing torch.distributed.tensor costs time and may be unavailable.
    return type(t).__name__ == "DTensor"


def _shard_group(model: nn.Module, root: nn.Module, named: Sequence[tuple[str, Any]], unitwise: bool) -> Any:
    """The process group over which FSDP2 (``fully_shard``) shards the gradients, or None.

    Each rank holds dim-0 shards of every gradient, so a parameter's squared norm is the
    sum over ranks of its shards' squared norms: one all-reduce per step of a vector of
    length n_params. Supported: every parameter a DTensor sharded on one 1-D mesh (plain
    ``fully_shard``). Anything else sharded is refused with a clear error rather than
    measured wrong.
    """
    for m in (model, *root.modules()):
        if type(m).__name__ == "FullyShardedDataParallel":
            raise GradwatchError(
                "gradwatch does not support FSDP1 (FullyShardedDataParallel) yet: its flat "
                "parameters hide the names and shapes gradwatch reports. Use fully_shard "
                "(FSDP2) or DistributedDataParallel."
            )
    sharded = [(n, p) for n, p in named if _is_dtensor(p)]
    if not sharded:
        return None
    if len(sharded) != len(named):
        plain = next(n for n, p in named if not _is_dtensor(p))
        raise GradwatchError(
            f"gradwatch does not support a model mixing fully_shard (DTensor) parameters "
            f"and plain ones yet: {sharded[0][0]!r} is sharded, {plain!r} is not. Apply "
            "fully_shard to the root module too."
        )
    mesh = sharded[0][1].device_mesh
    for name, p in sharded:
        placements = tuple(p.placements)
        if p.device_mesh != mesh or mesh.ndim != 1 or not all(pl.is_shard() for pl in placements):
            raise GradwatchError(
                f"gradwatch supports fully_shard on a 1-D device mesh only (not yet HSDP or "
                f"tensor parallelism): parameter {name!r} has placements {placements} on "
                f"{p.device_mesh}."
            )
    if unitwise:
        raise GradwatchError(
            "gradwatch does not support policy='agc' with fully_shard yet: unit-wise "
            "clipping of sharded biases needs norms gathered across ranks. Use 'fixed', "
            "'autoclip' or 'zclip'."
        )
    return mesh.get_group()


def _sparse_grad_positions(root: nn.Module, named: Sequence[tuple[str, Any]]) -> list[int]:
    """Positions of parameters whose gradient is sparse (``nn.Embedding(sparse=True)``)."""
    ids = {
        id(m.weight)
        for m in root.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and getattr(m, "sparse", False)
    }
    return [i for i, (_, p) in enumerate(named) if id(p) in ids]


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
        policy = getattr(monitor, "policy", None)
        self._unitwise = bool(getattr(policy, "unitwise", False))
        self._shard_group = _shard_group(model, root, named, self._unitwise)
        self._monitor = monitor
        self._model = weakref.ref(root)
        self.names = [n for n, _ in named]
        self.layers = [_owner(n) for n in self.names]
        self._groups = GradGroups(
            [p for _, p in named],
            local_shards=self._shard_group is not None,
            sparse=_sparse_grad_positions(root, named),
        )
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._handles = HandleGroup()
        self._closed = False
        self._broken = False
        self._distributed_checked = False
        self._world = 1
        self._pending_state: dict[str, Any] = {}
        monitor.bind(self.names, self.layers)

        # Recurrent probes: only when profiling is on at all.
        profile_every = getattr(getattr(monitor, "options", None), "profile_every", 10)
        self._probes: list[Probe] = find_probes(root, monitor.profile_due) if profile_every else []
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
            if self._shard_group is not None:  # FSDP2: sum the shards' squared norms
                sq = norms.to(torch.float64).square()
                torch.distributed.all_reduce(sq, group=self._shard_group)
                norms = sq.sqrt()
            parts: list[Tensor] = [norms]
            temporal_names, temporal_lens, temporal_parts, gate_names, gate_parts = self._gather_local()
            spectral_names, spectral_parts = self._gather_spectral()
            parts += temporal_parts + spectral_parts + gate_parts
            factors: list[Tensor | None] | None = None
            policy = getattr(self._monitor, "policy", None)
            if self._unitwise and policy is not None:
                flat = [g for gl in grads for g in gl]
                params = [p for grp in self._groups.groups for p in grp.params]
                factors, clipped_sq = agc_factors(params, flat, float(policy.clip_factor), float(policy.eps))
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
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break(exc)
            return None

        try:
            record = self._monitor.process(sq_norms, **kwargs)
        except NonFiniteGradientError:
            raise  # on_nonfinite="raise": nothing has been changed yet
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
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
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            self._break(exc)
        return record

    def _gather_local(self) -> tuple[list[str], list[int], list[Tensor], list[tuple[str, str]], list[Tensor]]:
        """What the probes gathered on this rank this step, still on the device:
        per-timestep norms (names, lengths, tensors) and gate statistics (names, tensors).

        Under DDP / FSDP each rank saw its own slice of the batch, so these are combined
        across ranks (see :meth:`_allreduce_local`) and every rank reports the same record.
        """
        names: list[str] = []
        lens: list[int] = []
        sqs: list[Tensor] = []
        gate_names: list[tuple[str, str]] = []
        gate_values: list[Tensor] = []
        for probe in self._probes:
            sq = probe.take_temporal()
            if sq is not None and sq.numel() > 0:
                names.append(probe.name)
                lens.append(int(sq.shape[0]))
                sqs.append(sq)
            if isinstance(probe, SequenceProbe):
                g = probe.take_gates()
                if g is not None:
                    gate_names.append((probe.name, probe.gate_name))
                    gate_values.append(g)
        if self._world > 1 and self._probes and self._profiled_step():
            # Every rank takes this branch on the same steps (the step counter is shared),
            # so the collectives below never wait for a rank that skipped them.
            sqs, gate_values = self._allreduce_local(lens, sqs, gate_values)
            if not sqs:
                names, lens = [], []
            if not gate_values:
                gate_names = []
        return names, lens, [s.clamp(min=0).sqrt() for s in sqs], gate_names, gate_values

    def _allreduce_local(
        self, lens: list[int], sqs: list[Tensor], gates: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Sum the squared per-timestep norms over ranks and average the gate statistics.

        DDP averages the ranks' losses, so the global loss's input gradient on rank r is
        1/world of the local one: the global batch's squared norm per timestep is
        sum_r ||g_r||^2 / world^2. Sequence lengths may differ between ranks; one MAX
        all-reduce over [layout, -layout] checks that all ranks hold the same layout
        first, and if not, this step's profiles are dropped on every rank.
        """
        dist = torch.distributed
        try:
            device = self._groups.device
            layout = [float(sum(lens)), float(len(lens)), float(len(gates))]
            meta = torch.tensor(layout + [-v for v in layout], dtype=torch.float64, device=device)
            dist.all_reduce(meta, op=dist.ReduceOp.MAX)
            if not torch.equal(meta[:3], -meta[3:]) or meta[:3].tolist() != layout:
                return [], []
            if not sqs and not gates:
                return [], []
            flat = torch.cat([t.reshape(-1).to(device=device, dtype=torch.float64) for t in sqs + gates])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            n_t = sum(lens)
            world = float(self._world)
            temporal = flat[:n_t] / world**2
            gate_flat = flat[n_t:] / world
            return list(torch.split(temporal, lens)) if lens else [], list(torch.split(gate_flat, 2)) if gates else []
        except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
            logger.error(
                "gradwatch: combining the per-timestep profiles across ranks failed (%s: %s); "
                "profiles are local to each rank from now on.",
                type(exc).__name__,
                exc,
            )
            self._world = 1
            return sqs, gates

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

    def _profiled_step(self) -> bool:
        try:
            return bool(self._monitor.profile_due())
        except Exception:  # noqa: BLE001 - no profiling rather than a broken step
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
            for probe in self._probes:  # the step counter stops: stop probing too
                probe.enabled = False
                probe.rearm()
            logger.error(
                "gradwatch: measuring the gradients failed (%s: %s); gradwatch stops measuring "
                "this model, training goes on unchanged. Please report this as a bug.",
                type(exc).__name__,
                exc,
                exc_info=exc,
            )


def attach(model: nn.Module, optimizer: object | None, monitor: Any) -> TorchAttachment:
    """Attach ``monitor`` to ``model`` (and ``optimizer``); see :class:`TorchAttachment`."""
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise GradwatchError(
            f"optimizer must be a torch.optim.Optimizer or None; received "
            f"{type(optimizer).__name__}. Without an optimizer, call watch.step() after "
            "backward() and before optimizer.step()."
        )
    return TorchAttachment(model, optimizer, monitor)
