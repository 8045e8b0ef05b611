"""The trajectories of the probed sequences through every recurrence of a layer.

:func:`sequence_trajectories` takes what the hooks of an ``nn.RNN`` / ``nn.LSTM`` /
``nn.GRU`` call saw (input, initial state, output) and returns one
:class:`~gradwatch_torch._replay.Trajectory` per (layer, direction), for the first
``min(B, PROBED)`` sequences of the batch in the user's order:

- the top layer's states are the layer's own output (nothing replayed);
- the layers below are replayed, one at a time, with the layer's own fused kernel
  (``torch._VF``) on the probed sequences, from the user's initial state;
- dropout between layers (``dropout > 0`` in training mode): on the CPU, the masks the
  kernel drew are drawn again from the RNG state saved just before the call (the kernel
  draws one Bernoulli mask over the whole layer output, in order, from the default
  generator), so the replay sees exactly the dropped-out input the next layer saw; the
  self-check of :mod:`gradwatch_torch._replay` (the top layer's output recomputed from the
  replay) confirms it. Elsewhere (CUDA/cuDNN keep their own dropout state) the layers
  above the first are replayed on their undropped input, the inference trajectory, and
  no self-check is made;
- packed sequences: each sequence over its own length; padded steps carry the state
  unchanged. A reversed direction is returned in its processing order (time flipped), in
  which a shorter sequence's padding comes first.

:func:`cell_trajectory` does the same for a loop of ``nn.*Cell`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from gradwatch_torch._replay import Trajectory

__all__ = ["PROBED", "cell_trajectory", "kind_of", "replay_dtype", "sequence_trajectories"]

from gradwatch.through_time.plan import PROBED  # noqa: E402 - the engine's plan: the first min(B, 8) sequences

_KINDS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


def kind_of(module: nn.Module) -> str:
    """"lstm", "gru", "rnn_tanh" or "rnn_relu" for a recurrent layer or cell."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return "gru"
    return "rnn_relu" if getattr(module, "nonlinearity", "tanh") == "relu" else "rnn_tanh"


def replay_dtype(weight: Tensor) -> torch.dtype:
    """float64 for a float64 layer, float32 otherwise (half-precision layers are replayed
    in float32: a product of 100 Jacobians needs the range)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _padded(x: Any, batch_first: bool, unbatched: bool, probed: int) -> Tensor:
    if unbatched:
        return x.unsqueeze(1)
    return x[:probed].transpose(0, 1) if batch_first else x[:, :probed]


class _Packing:
    """Where the probed sequences sit in a PackedSequence (all index maths on the CPU,
    where PyTorch keeps ``batch_sizes``)."""

    def __init__(self, packed: PackedSequence) -> None:
        bs = packed.batch_sizes.cpu()
        self.batch = int(bs[0])
        self.probed = min(self.batch, PROBED)
        user = torch.arange(self.probed)
        pos = packed.unsorted_indices.cpu()[user] if packed.unsorted_indices is not None else user
        lengths = (bs.unsqueeze(1) > pos.unsqueeze(0)).sum(dim=0)  # steps each probed sequence has
        self.lengths = lengths
        self.steps = int(lengths.max())
        offsets = torch.cumsum(bs, 0) - bs
        valid = torch.arange(self.steps).unsqueeze(1) < lengths.unsqueeze(0)  # (T, P)
        rows = offsets[: self.steps].unsqueeze(1) + pos.unsqueeze(0)
        self.rows = torch.where(valid, rows, 0).reshape(-1)
        self.valid_cpu = valid

    def gather(self, data: Tensor) -> Tensor:
        got = data.index_select(0, self.rows.to(data.device)).view(self.steps, self.probed, -1)
        return torch.where(self.valid_cpu.to(data.device).unsqueeze(-1), got, 0)


def _layer_weights(module: nn.RNNBase, layer: int, direction: int, dt: torch.dtype) -> dict[str, Tensor | None]:
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    got: dict[str, Tensor | None] = {}
    for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
        w = getattr(module, key + sfx, None)
        got[key] = w.detach().to(dt) if isinstance(w, Tensor) else None
    return got


def _replay_layer(
    module: nn.RNNBase, layer: int, inp: Tensor, h0: Tensor, c0: Tensor | None, packing: _Packing | None, dt: torch.dtype
) -> Tensor:
    """One layer (both directions) on the probed sequences with the fused kernel: (T, P, D*Hp)."""
    dirs = 2 if module.bidirectional else 1
    flat: list[Tensor] = []
    for d in range(dirs):
        w = _layer_weights(module, layer, d, dt)
        flat += [t for t in (w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"], w["weight_hr"]) if t is not None]
    fn = getattr(torch._VF, {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}[module.mode])
    bias = bool(module.bias)
    hx: Any = (h0, c0) if module.mode == "LSTM" else h0
    if packing is None:
        return fn(inp, hx, flat, bias, 1, 0.0, False, module.bidirectional, False)[0]
    sub = pack_padded_sequence(inp, packing.lengths, enforce_sorted=False)
    si = sub.sorted_indices
    hx = (h0[:, si], c0[:, si]) if c0 is not None else h0[:, si]  # type: ignore[index]
    out = fn(sub.data, sub.batch_sizes, hx, flat, bias, 1, 0.0, False, module.bidirectional)[0]
    return pad_packed_sequence(PackedSequence(out, sub.batch_sizes, si, sub.unsorted_indices), total_length=inp.shape[0])[0]


def _dropout_masks(
    module: nn.RNNBase, rng_state: Tensor, full_shape: tuple[int, ...], dtype: torch.dtype, pick: Any
) -> list[Tensor]:
    """The Bernoulli masks the fused kernel drew after each layer but the last, drawn again
    from the saved RNG state (the user's RNG is restored afterwards), scaled as the kernel
    scales them, restricted to the probed sequences by ``pick``."""
    p = float(module.dropout)
    masks = []
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        for _ in range(module.num_layers - 1):
            noise = torch.empty(full_shape, dtype=dtype).bernoulli_(1 - p)
            masks.append(pick(noise).div_(1 - p))
    return masks


@torch.no_grad()
def sequence_trajectories(
    module: nn.RNNBase, x: Any, hx: Any, output: Any, rng_state: Tensor | None
) -> tuple[list[Trajectory], bool]:
    """Every (layer, direction) of one call of ``module``; and whether the replay is
    expected to reproduce the layer's output exactly (False when dropout masks could
    not be drawn again)."""
    dt = replay_dtype(module.weight_hh_l0)  # type: ignore[arg-type]
    out = output[0] if isinstance(output, tuple) else output
    layers, dirs = module.num_layers, 2 if module.bidirectional else 1
    hidden = module.hidden_size
    proj = module.proj_size if getattr(module, "proj_size", 0) else hidden
    packing: _Packing | None = None
    if isinstance(x, PackedSequence):
        packing = _Packing(x)
        inp, top, probed = packing.gather(x.data).to(dt), packing.gather(out.data).to(dt), packing.probed
        valid: Tensor | None = packing.valid_cpu.to(inp.device)
        full_shape: tuple[int, ...] = (int(x.data.shape[0]), dirs * proj)
    else:
        unbatched = x.dim() == 2
        probed = 1 if unbatched else min(int(x.shape[0 if module.batch_first else 1]), PROBED)
        inp = _padded(x, module.batch_first, unbatched, probed).to(dt)
        top = _padded(out, module.batch_first, unbatched, probed).to(dt)
        valid = None
        steps = int(x.shape[1 if module.batch_first and not unbatched else 0])
        full_shape = (steps, 1 if unbatched else int(x.shape[0 if module.batch_first else 1]), dirs * proj)
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    dev = inp.device

    def initial(state: Tensor | None, width: int) -> Tensor:
        if state is None:
            return torch.zeros(layers * dirs, probed, width, dtype=dt, device=dev)
        state = state.unsqueeze(1) if state.dim() == 2 else state[:, :probed]
        return state.detach().to(dt)

    hs0 = initial(h0, proj)
    cs0 = initial(c0, hidden) if module.mode == "LSTM" else None
    masks: list[Tensor] = []
    exact = True
    if module.training and module.dropout > 0 and layers > 1:
        if rng_state is not None and dev.type == "cpu":
            if packing is not None:
                rows, keep = packing.rows, packing.valid_cpu.unsqueeze(-1)

                def pick(noise: Tensor) -> Tensor:
                    return torch.where(keep, noise.index_select(0, rows).view(keep.shape[0], keep.shape[1], -1), 0)
            else:

                def pick(noise: Tensor) -> Tensor:
                    return noise[:, :probed]

            out_dtype = (out.data if isinstance(out, PackedSequence) else out).dtype
            masks = [m.to(dt) for m in _dropout_masks(module, rng_state, full_shape, out_dtype, pick)]
        else:
            exact = False
    trajectories: list[Trajectory] = []
    for layer in range(layers):
        sl = slice(layer * dirs, (layer + 1) * dirs)
        states = top if layer == layers - 1 else _replay_layer(module, layer, inp, hs0[sl], cs0[sl] if cs0 is not None else None, packing, dt)
        for d in range(dirs):
            w = _layer_weights(module, layer, d, dt)
            k = layer * dirs + d
            xs, hs, vs = inp, states[..., d * proj : (d + 1) * proj], valid
            if d == 1:
                xs, hs = xs.flip(0), hs.flip(0)
                vs = vs.flip(0) if vs is not None else None
            if vs is not None:  # padded steps hold the carried (initial) state
                hs = torch.where(vs.unsqueeze(-1), hs, hs0[k].unsqueeze(0))
            trajectories.append(
                Trajectory(
                    name=f"l{layer}" + ("_reverse" if d else ""),
                    kind=_KINDS[module.mode],
                    x=xs,
                    h=hs,
                    h0=hs0[k],
                    c0=cs0[k] if cs0 is not None else None,
                    valid=vs,
                    w_ih=w["weight_ih"],  # type: ignore[arg-type]
                    w_hh=w["weight_hh"],  # type: ignore[arg-type]
                    b_ih=w["bias_ih"],
                    b_hh=w["bias_hh"],
                    w_hr=w["weight_hr"],
                )
            )
        if layer < layers - 1:
            inp = states * masks[layer] if masks else states
    return trajectories, exact


@torch.no_grad()
def cell_trajectory(module: nn.Module, xs: Sequence[Tensor], hs: Sequence[Tensor], h0: Tensor | None, c0: Tensor | None) -> Trajectory:
    """A loop of cell calls as one recurrence ("l0"): ``xs[t]`` the input of call t,
    ``hs[t]`` its output h, ``h0`` / ``c0`` the state the first call started from."""
    w_hh: Tensor = module.weight_hh  # type: ignore[assignment]
    dt = replay_dtype(w_hh)
    x = torch.stack([t.reshape(t.shape[0] if t.dim() > 1 else 1, -1) for t in xs]).to(dt)
    h = torch.stack([t.reshape(x.shape[1], -1) for t in hs]).to(dt)
    hidden = w_hh.shape[1]

    def first(state: Tensor | None) -> Tensor:
        return torch.zeros(x.shape[1], hidden, dtype=dt, device=x.device) if state is None else state.reshape(x.shape[1], -1).to(dt)

    bias = bool(getattr(module, "bias", True))
    return Trajectory(
        name="l0",
        kind=kind_of(module),
        x=x,
        h=h,
        h0=first(h0),
        c0=first(c0) if isinstance(module, nn.LSTMCell) else None,
        valid=None,
        w_ih=module.weight_ih.detach().to(dt),  # type: ignore[union-attr,operator]
        w_hh=w_hh.detach().to(dt),
        b_ih=module.bias_ih.detach().to(dt) if bias else None,  # type: ignore[union-attr,operator]
        b_hh=module.bias_hh.detach().to(dt) if bias else None,  # type: ignore[union-attr,operator]
    )


_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def replay_flops(kind: str, layers: int, dirs: int, inp: int, hidden: int, proj: int, probed: int, steps: int) -> float:
    """What one replay costs, in flops of a training step (the engine's cost model,
    :mod:`gradwatch.through_time.plan`, with its SMALL_MATMUL_PENALTY on the sweeps).

    Per (layer, direction): the gates of all steps (one product over the layer's input
    and state widths), the layer itself once more when it is below the top (its states
    are not exposed), and the sweeps: the block of :func:`~gradwatch.through_time.plan.sweep_vectors`
    rows backward per sequence, and about two tangents' worth forward when estimated.
    """
    from gradwatch.through_time.plan import EXACT_DIM, SMALL_MATMUL_PENALTY, sweep_vectors

    g = _GATES[kind]
    dim = proj + hidden if kind == "lstm" else hidden
    vectors = probed * (sweep_vectors(dim, probed, steps) + (0 if dim <= EXACT_DIM else 3))
    total = 0.0
    for layer in range(layers):
        width = inp if layer == 0 else dirs * proj
        gates = 2.0 * probed * steps * g * hidden * (width + proj)
        sweeps = 2.0 * vectors * steps * g * hidden * proj * SMALL_MATMUL_PENALTY
        total += dirs * (gates * (2 if layer < layers - 1 else 1) + sweeps)
    return total
