"""Two gloo ranks on 127.0.0.1 training a sharded (FSDP2) or DDP model with gradwatch,
against an unsharded reference that sees both ranks' batches.

Run by test_torch_distributed.py as ``python dist_worker.py fsdp|ddp|ddp_nan OUT.json``; rank 0
writes what both ranks recorded and what the reference computed.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 3
WORLD = 2


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x)
        return self.head(out).square().mean()


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(100 * step + rank))


def run_nan_on_one_rank(rank: int, out: str) -> None:
    """DDP, on_nonfinite="skip": rank 1's gradient turns NaN after the all-reduce at step 2
    (a step pre-hook registered before gradwatch's). Every rank must skip that step."""
    import gradwatch

    torch.manual_seed(0)
    init = Model()
    ref = copy.deepcopy(init)
    model = copy.deepcopy(init)
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(wrapped.parameters(), lr=0.01)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    state = {"step": 0}

    def poison(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        state["step"] += 1
        if rank == 1 and state["step"] == NAN_STEP:
            next(iter(model.parameters())).grad.view(-1)[0] = float("nan")

    opt.register_step_pre_hook(poison)  # before gradwatch's hook: runs first
    with gradwatch.watch(wrapped, opt, policy="fixed", max_norm=0.05, on_nonfinite="skip", profile_every=0, sinks=["memory"]) as w:
        for step in range(STEPS):
            opt.zero_grad()
            wrapped(batch(step, rank)).backward()
            opt.step()
            # reference: unwatched, unsharded, the global batch, that step skipped by hand
            ref_opt.zero_grad()
            (sum(ref(batch(step, r)) for r in range(WORLD)) / WORLD).backward()
            if step + 1 != NAN_STEP:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
                ref_opt.step()
        mine = {"skipped": [r.skipped for r in w.records], "clip": [r.clip.scale if r.clip else None for r in w.records]}
    mine["weights"] = {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()}
    mine["ref_diff"] = max((p.detach() - dict(ref.named_parameters())[n].detach()).abs().max().item() for n, p in model.named_parameters())
    everyone: list = [None] * WORLD
    dist.all_gather_object(everyone, mine)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": everyone}, f)


NAN_STEP = 2


def run(rank: int, port: int, mode: str, out: str) -> None:
    _run(rank, port, mode, out)
    os._exit(0)  # done: no interpreter teardown racing gloo's threads (SIGABRT)


def _run(rank: int, port: int, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    if mode == "ddp_nan":
        try:
            run_nan_on_one_rank(rank, out)
        finally:
            dist.destroy_process_group()
        return
    import gradwatch

    try:
        torch.manual_seed(0)
        init = Model()
        ref = copy.deepcopy(init)
        model = copy.deepcopy(init)
        if mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            fully_shard(model.gru)
            fully_shard(model)
            wrapped = model
        else:
            wrapped = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        ref_norms = []
        ref_temporal = []
        with gradwatch.watch(wrapped, opt, policy="fixed", max_norm=0.05, profile_every=1, sinks=["memory"]) as w:
            for step in range(STEPS):
                opt.zero_grad()
                wrapped(batch(step, rank)).backward()
                opt.step()
                # reference: the mean of the two ranks' losses, unsharded
                ref_opt.zero_grad()
                xs = [batch(step, r).requires_grad_() for r in range(WORLD)]
                (sum(ref(x) for x in xs) / WORLD).backward()
                ref_temporal.append(sum(x.grad.square().sum((1, 2)) for x in xs).sqrt().tolist())
                ref_norms.append({n: p.grad.norm().item() for n, p in ref.named_parameters()})
                torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
                ref_opt.step()
            mine = [
                {
                    "param_norms": dict(r.param_norms),
                    "clip": r.clip.scale if r.clip else None,
                    "temporal": {k: list(p.norms) for k, p in r.temporal.items()},
                    "spectral": dict(r.spectral),
                    "gates": {k: [g.mean, g.log_path_gain] for k, g in r.gates.items()},
                }
                for r in w.records
            ]
        weights = {}
        for n, p in model.named_parameters():
            full = p.full_tensor() if type(p).__name__ == "DTensor" else p
            weights[n] = (full.detach() - dict(ref.named_parameters())[n].detach()).abs().max().item()
        everyone: list = [None] * WORLD
        dist.all_gather_object(everyone, mine)
        dist.barrier()  # no rank tears gloo down while another still talks (SIGABRT)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(
                    {"records": everyone, "ref_norms": ref_norms, "ref_temporal": ref_temporal, "weight_diff": weights},
                    f,
                )
    finally:
        dist.destroy_process_group()


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(port, mode, out), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
