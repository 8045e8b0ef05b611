"""One small adapter per framework, so the contract tests read the same for both.

Each adapter builds a tiny recurrent model (an LSTM and a linear head, loss on the last
step), trains it one step at a time in the framework's own custom-loop style, and gives
independent ground truth (gradients from autograd / ``tf.GradientTape``, the framework's
own clipping) and inspection (weights, optimizer state, what is attached).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gradwatch

T, F, H, B = 7, 3, 5, 4

# --------------------------------------------------------------------- through time
# The propagation cases (shared/API.md, "Through time"): each adapter builds the layer,
# runs one watched step at learning rate 0 with profile_every=1, and hands back what the
# record says (TemporalProfile.recurrences) with the weights of every recurrence in
# PyTorch's layout and gate order, so the test can compute the float64 reference of
# gradwatch.through_time.reference from them in numpy, the same way for both backends.

TT_CASES = ("rnn", "gru", "lstm", "stacked", "bidirectional", "proj_size", "masked", "go_backwards")
TT_T, TT_F, TT_B = 6, 3, 10  # batch 10 > 8: only the first 8 sequences are probed


@dataclass
class Recurrence:
    """One recurrence (layer x direction) as the reference needs it."""

    layer: str  # the temporal key of the layer
    key: str  # "l0", "l1", "l0_reverse", ...
    kind: str  # "rnn_tanh", "gru", "lstm" (reference.cell_jacobians)
    weights: dict[str, np.ndarray]  # PyTorch names without the layer suffix
    reverse: bool = False  # processes the sequence back to front
    source: tuple[tuple[str, str], ...] = ()  # (layer, key)s whose outputs are its input; () = x


@dataclass
class ThroughTime:
    x: np.ndarray  # (B, T, F) float32, batch first
    mask: np.ndarray  # (B, T) bool: False = padded / masked (the identity)
    recurrences: list[Recurrence]  # in dependency order
    got: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> key -> Propagation


def tt_data(case: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7 + TT_CASES.index(case))
    x = rng.standard_normal((TT_B, TT_T, TT_F)).astype(np.float32)
    return x, np.ones((TT_B, TT_T), bool)


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def batch(step: int, nan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic data for step ``step`` (a NaN input gives NaN gradients)."""
    rng = np.random.default_rng(1000 + step)
    x = rng.standard_normal((B, T, F)).astype(np.float32)
    y = rng.standard_normal((B, 1)).astype(np.float32) * 3
    if nan:
        x[0, 2, 0] = np.nan
    return x, y


class TorchAdapter:
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def build(self, seed: int = 0) -> tuple[Any, Any]:
        torch, nn = self.torch, self.torch.nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = nn.LSTM(F, H, batch_first=True)
                self.head = nn.Linear(H, 1)

            def forward(self, x: Any) -> Any:
                out, _ = self.rnn(x)
                return self.head(out[:, -1])

        torch.manual_seed(seed)
        model = Net()
        return model, torch.optim.Adam(model.parameters(), lr=0.05)

    def clone(self, model: Any, opt: Any) -> tuple[Any, Any]:
        m2 = copy.deepcopy(model)
        o2 = self.torch.optim.Adam(m2.parameters(), lr=0.05)
        o2.load_state_dict(copy.deepcopy(opt.state_dict()))
        return m2, o2

    def _loss(self, model: Any, x: np.ndarray, y: np.ndarray) -> Any:
        torch = self.torch
        return torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y))

    def train_step(self, model: Any, opt: Any, step: int, nan: bool = False, clip: float | None = None) -> None:
        x, y = batch(step, nan)
        opt.zero_grad(set_to_none=True)
        self._loss(model, x, y).backward()
        if clip is not None:
            self.torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    def true_global_norm(self, model: Any, step: int) -> float:
        """sqrt(sum ||dL/dp||^2) by torch.autograd.grad, float64."""
        x, y = batch(step)
        params = [p for p in model.parameters()]
        grads = self.torch.autograd.grad(self._loss(model, x, y), params)
        return float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)))

    def weights(self, model: Any) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in model.parameters()]

    def opt_state(self, opt: Any) -> list[np.ndarray]:
        out = []
        for st in opt.state.values():
            for v in st.values():
                out.append(v.detach().numpy().copy() if self.torch.is_tensor(v) else np.asarray(v))
        return out

    through_time_skip: str | None = None
    TT_SKIP = {"go_backwards": "go_backwards is a Keras option: PyTorch has no such layer argument"}

    def through_time(self, case: str) -> ThroughTime:
        torch, nn = self.torch, self.torch.nn
        torch.manual_seed(TT_CASES.index(case))
        x, mask = tt_data(case)
        if case == "rnn":
            rnn, kind = nn.RNN(TT_F, 5, batch_first=True), "rnn_tanh"
        elif case == "gru":
            rnn, kind = nn.GRU(TT_F, 5, batch_first=True), "gru"
        elif case == "stacked":
            rnn, kind = nn.LSTM(TT_F, 4, num_layers=2, batch_first=True), "lstm"
        elif case == "bidirectional":
            rnn, kind = nn.LSTM(TT_F, 4, batch_first=True, bidirectional=True), "lstm"
        elif case == "proj_size":
            rnn, kind = nn.LSTM(TT_F, 6, proj_size=3, batch_first=True), "lstm"  # s = (h: 3, c: 6)
        else:  # lstm, masked
            rnn, kind = nn.LSTM(TT_F, 4, batch_first=True), "lstm"
        lengths = None
        if case == "masked":  # unsorted lengths; padded steps hold garbage the packing drops
            lengths = np.array([6, 4, 5, 2, 6, 3, 1, 5, 6, 4])
            mask = np.arange(TT_T)[None, :] < lengths[:, None]
            x[~mask] = 99.0

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.rnn = rnn

            def forward(self, xb: Any) -> Any:
                if lengths is None:
                    return self.rnn(xb)[0]
                lens = torch.as_tensor(lengths)
                pack = nn.utils.rnn.pack_padded_sequence(xb, lens, batch_first=True, enforce_sorted=False)
                out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(pack)[0], batch_first=True, total_length=TT_T)
                return out

        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with gradwatch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
            opt.zero_grad()
            model(torch.from_numpy(x)).square().mean().backward()
            opt.step()
            rec = w.records[-1]
        recs = []
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        sfxs = ("", "_reverse") if rnn.bidirectional else ("",)
        for k in range(rnn.num_layers):
            for sfx in sfxs:  # layer k's input: layer k-1's outputs, both directions concatenated
                present = [n for n in names if hasattr(rnn, f"{n}_l{k}{sfx}")]
                wts = {n: _f64(getattr(rnn, f"{n}_l{k}{sfx}").detach()) for n in present}
                src = () if k == 0 else tuple(("rnn", f"l{k - 1}{s}") for s in sfxs)
                recs.append(Recurrence("rnn", f"l{k}{sfx}", kind, wts, reverse=bool(sfx), source=src))
        return ThroughTime(x, mask, recs, {n: dict(p.recurrences) for n, p in rec.temporal.items()})

    def leftovers(self, model: Any, opt: Any) -> list[str]:
        """Hooks still installed on the model or the optimizer."""
        left = []
        for name, m in model.named_modules():
            for attr in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"):
                if getattr(m, attr, None):
                    left.append(f"{name or 'model'}.{attr}")
        if getattr(opt, "_optimizer_step_pre_hooks", None):
            left.append("optimizer step pre-hook")
        return left


class KerasAdapter:
    """Keras 3 on whichever backend ``KERAS_BACKEND`` names; the ground truth is that
    backend's own autodiff (``tf.GradientTape``, ``jax.grad``, ``torch.autograd``)."""

    name = "keras"

    def __init__(self) -> None:
        import keras

        self.keras = keras
        self.kind = keras.backend.backend()

    def build(self, seed: int = 0) -> tuple[Any, Any]:
        keras = self.keras
        keras.utils.set_random_seed(seed)
        inp = keras.Input((T, F))
        out = keras.layers.Dense(1, name="head")(keras.layers.LSTM(H, name="rnn")(inp))
        model = keras.Model(inp, out)
        return model, keras.optimizers.Adam(0.05)

    def clone(self, model: Any, opt: Any) -> tuple[Any, Any]:
        m2 = self.keras.models.clone_model(model)
        m2.set_weights(model.get_weights())
        o2 = self.keras.optimizers.Adam(0.05)
        o2.build(m2.trainable_variables)
        for a, b in zip(o2.variables, opt.variables):
            a.assign(b)
        return m2, o2

    def _grads(self, model: Any, x: np.ndarray, y: np.ndarray | None) -> list[Any]:
        """The backend's own gradients of the MSE to ``y`` (of the mean square output
        when ``y`` is None), as a custom training loop on that backend takes them."""
        keras, tvars = self.keras, model.trainable_variables
        if y is None:
            def mse(_: Any, pred: Any) -> Any:
                return keras.ops.mean(keras.ops.square(pred))
        else:
            mse = keras.losses.MeanSquaredError()
        if self.kind == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = mse(y, model(x, training=True))
            return list(tape.gradient(loss, tvars))
        if self.kind == "jax":
            import jax

            non_trainable = [v.value for v in model.non_trainable_variables]

            def loss_of(trainable: Any) -> Any:
                pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
                return mse(y, pred)

            return list(jax.grad(loss_of)([v.value for v in tvars]))
        import torch

        loss = mse(None if y is None else torch.as_tensor(y), model(torch.as_tensor(x), training=True))
        return list(torch.autograd.grad(loss, [v.value for v in tvars]))

    def train_step(self, model: Any, opt: Any, step: int, nan: bool = False, clip: float | None = None) -> None:
        x, y = batch(step, nan)
        grads = self._grads(model, x, y)
        if clip is not None:  # tf.clip_by_global_norm's definition: g * clip / max(norm, clip)
            ops = self.keras.ops
            norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
            grads = [g * (clip / ops.maximum(norm, clip)) for g in grads]
        opt.apply_gradients(zip(grads, model.trainable_variables))

    def true_global_norm(self, model: Any, step: int) -> float:
        x, y = batch(step)
        to_np = self.keras.ops.convert_to_numpy
        return float(np.sqrt(sum(float(np.sum(np.asarray(to_np(g)).astype(np.float64) ** 2)) for g in self._grads(model, x, y))))

    def weights(self, model: Any) -> list[np.ndarray]:
        return [w.copy() for w in model.get_weights()]

    def opt_state(self, opt: Any) -> list[np.ndarray]:
        return [np.asarray(self.keras.ops.convert_to_numpy(v.value)).copy() for v in opt.variables]

    TT_SKIP = {"proj_size": "Keras' LSTM has no projection (proj_size is PyTorch's)"}

    #: Propagation through time is measured on every Keras backend.
    through_time_skip: str | None = None

    def _torch_layout(self, cell: Any) -> tuple[str, dict[str, np.ndarray]]:
        """A Keras cell's weights as PyTorch's (weight_ih, weight_hh, bias_ih, bias_hh)."""
        kernel, rec = _f64(cell.kernel.numpy()).T, _f64(cell.recurrent_kernel.numpy()).T
        bias = None if cell.bias is None else _f64(cell.bias.numpy())
        name = type(cell).__name__
        if name == "GRUCell":  # reset_after=True: gates z, r, h -> PyTorch's r, z, n; bias rows (input, recurrent)
            assert cell.reset_after
            u = cell.units

            def order(m: np.ndarray) -> np.ndarray:
                return np.concatenate([m[u : 2 * u], m[:u], m[2 * u :]])

            wts = {"weight_ih": order(kernel), "weight_hh": order(rec)}
            if bias is not None:
                wts.update(bias_ih=order(bias[0]), bias_hh=order(bias[1]))
            return "gru", wts
        kind = {"LSTMCell": "lstm", "SimpleRNNCell": "rnn_tanh"}[name]  # LSTM gates i, f, c, o = PyTorch's i, f, g, o
        wts = {"weight_ih": kernel, "weight_hh": rec}
        if bias is not None:
            wts.update(bias_ih=bias, bias_hh=np.zeros_like(bias))
        return kind, wts

    def through_time(self, case: str) -> ThroughTime:
        keras, L = self.keras, self.keras.layers
        keras.utils.set_random_seed(TT_CASES.index(case))
        x, mask = tt_data(case)
        inp = keras.Input((TT_T, TT_F))
        h = inp
        if case == "masked":  # post-padding, pre-padding and a step masked mid-sequence
            mask[0, 4:] = mask[1, :2] = mask[2, 3] = mask[5, 1:3] = mask[9, 5] = False
            x[~mask] = 0.0
            h = L.Masking(0.0)(h)
        if case == "rnn":
            layers = [L.SimpleRNN(5, return_sequences=True, name="rnn")]
        elif case == "gru":
            layers = [L.GRU(5, return_sequences=True, name="rnn")]
        elif case == "stacked":
            layers = [L.LSTM(4, return_sequences=True, name="lstm1"), L.LSTM(3, return_sequences=True, name="lstm2")]
        elif case == "bidirectional":
            layers = [L.Bidirectional(L.LSTM(4, return_sequences=True), name="rnn")]
        elif case == "go_backwards":
            layers = [L.LSTM(4, return_sequences=True, go_backwards=True, name="rnn")]
        else:  # lstm, masked
            layers = [L.LSTM(4, return_sequences=True, name="rnn")]
        for layer in layers:
            h = layer(h)
        model = keras.Model(inp, h)
        opt = keras.optimizers.SGD(0.0)
        with gradwatch.watch(model, opt, profile_every=1, sinks=["memory"]) as w:
            opt.apply_gradients(zip(self._grads(model, x, None), model.trainable_variables))
            rec = w.records[-1]
        recs: list[Recurrence] = []
        for layer in layers:
            src = (recs[-1].layer, recs[-1].key) if recs else None
            if isinstance(layer, L.Bidirectional):
                for key, sub in (("l0", layer.forward_layer), ("l0_reverse", layer.backward_layer)):
                    kind, wts = self._torch_layout(sub.cell)
                    recs.append(Recurrence(layer.name, key, kind, wts, reverse=sub.go_backwards))
            else:
                kind, wts = self._torch_layout(layer.cell)
                source = (src,) if src else ()  # a stacked layer reads the outputs of the layer below
                recs.append(Recurrence(layer.name, "l0", kind, wts, reverse=layer.go_backwards, source=source))
        return ThroughTime(x, mask, recs, {n: dict(p.recurrences) for n, p in rec.temporal.items()})

    def leftovers(self, model: Any, opt: Any) -> list[str]:
        """Wrappers still on the optimizer instance or on a layer."""
        left = ["optimizer.apply"] if "apply" in vars(opt) else []
        for layer in model._flatten_layers(include_self=False):
            if "call" in layer.__dict__:
                left.append(f"{layer.name}.call")
        return left


def make(name: str) -> Any:
    return TorchAdapter() if name == "torch" else KerasAdapter()


def watch(backend: Any, model: Any, opt: Any, **options: Any) -> gradwatch.Watch:
    options.setdefault("sinks", ["memory"])
    return gradwatch.watch(model, opt, **options)
