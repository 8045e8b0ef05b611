"""Distributed training: the rank, FSDP2 shards, and combining per-rank profiles.

Under DDP the step pre-hook sees gradients already all-reduced (identical on every rank),
so norms need nothing. Under FSDP2 (``fully_shard``) each rank holds dim-0 shards, so a
parameter's squared norm is the sum of its shards' over ranks: one small all-reduce.
What the recurrent probes gather comes from each rank's own slice of the batch and is
combined across ranks on profiled steps, so every rank reports the same record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gradwatch.errors import GradwatchError

__all__ = ["agree_norms", "allreduce_profiles", "is_dtensor", "rank_and_world", "shard_group"]

logger = logging.getLogger("gradwatch")


def is_dtensor(t: object) -> bool:
    # By name: importing torch.distributed.tensor costs time and may be unavailable.
    return type(t).__name__ == "DTensor"


def rank_and_world() -> tuple[int, int] | None:
    """(rank, world size) once torch.distributed is initialised, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def agree_norms(norms: Tensor) -> Tensor:
    """The norms every DDP rank decides on: the elementwise max over ranks, a non-finite
    norm on any rank becoming +inf on all (one small all-reduce, no host read).

    DDP hands every rank the same all-reduced gradients, but something between the
    all-reduce and the optimizer (a hook, a rank-local bug) may still make one rank's
    gradient non-finite. Deciding on local numbers would skip or clip that step on one
    rank only and the replicas would silently diverge. NaN is mapped to +inf before the
    MAX (a MAX may drop a NaN depending on its order); the record then says "non-finite"
    on every rank. Identical norms (the normal case) come back unchanged.
    """
    dist = torch.distributed
    agreed = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, float("inf")))
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return agreed


def shard_group(model: nn.Module, root: nn.Module, named: Sequence[tuple[str, Any]], unitwise: bool) -> Any:
    """The process group over which FSDP2 (``fully_shard``) shards the gradients, or None.

    Supported: every parameter a DTensor sharded on one 1-D mesh (plain ``fully_shard``).
    Anything else sharded is refused with a clear error rather than measured wrong.
    """
    for m in (model, *root.modules()):
        if type(m).__name__ == "FullyShardedDataParallel":
            raise GradwatchError(
                "gradwatch does not support FSDP1 (FullyShardedDataParallel) yet: its flat parameters hide the names "
                "and shapes gradwatch reports. Use fully_shard (FSDP2) or DistributedDataParallel."
            )
    sharded = [(n, p) for n, p in named if is_dtensor(p)]
    if not sharded:
        return None
    if len(sharded) != len(named):
        plain = next(n for n, p in named if not is_dtensor(p))
        raise GradwatchError(
            f"gradwatch does not support a model mixing fully_shard (DTensor) parameters and plain ones yet: "
            f"{sharded[0][0]!r} is sharded, {plain!r} is not. Apply fully_shard to the root module too."
        )
    mesh = sharded[0][1].device_mesh
    for name, p in sharded:
        placements = tuple(p.placements)
        if p.device_mesh != mesh or mesh.ndim != 1 or not all(pl.is_shard() for pl in placements):
            raise GradwatchError(
                f"gradwatch supports fully_shard on a 1-D device mesh only (not yet HSDP or tensor parallelism): "
                f"parameter {name!r} has placements {placements} on {p.device_mesh}."
            )
    if unitwise:
        raise GradwatchError(
            "gradwatch does not support policy='agc' with fully_shard yet: unit-wise clipping of sharded biases "
            "needs norms gathered across ranks. Use 'fixed', 'autoclip' or 'zclip'."
        )
    return mesh.get_group()


def allreduce_profiles(
    world: int, device: torch.device, lens: list[int], sqs: list[Tensor], gates: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]] | None:
    """Sum the squared per-timestep norms over ranks and average the gate statistics.

    DDP averages the ranks' losses, so the global loss's input gradient on rank r is
    1/world of the local one: the global batch's squared norm per timestep is
    sum_r ||g_r||^2 / world^2. Sequence lengths may differ between ranks; one MAX
    all-reduce over [layout, -layout] checks that all ranks hold the same layout first,
    and if not, this step's profiles are dropped on every rank (empty lists). Returns
    None when the collective fails (then profiles stay local from now on).
    """
    dist = torch.distributed
    try:
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
        temporal = flat[:n_t] / float(world) ** 2
        gate_flat = flat[n_t:] / float(world)
        return (list(torch.split(temporal, lens)) if lens else [], list(torch.split(gate_flat, 2)) if gates else [])
    except Exception as exc:  # noqa: BLE001 - gradwatch must never break training
        logger.error(
            "gradwatch: combining the per-timestep profiles across ranks failed (%s: %s); profiles are local to each "
            "rank from now on.",
            type(exc).__name__,
            exc,
        )
        return None
