"""One small adapter per framework, so the contract tests read the same for both.

Each adapter builds a tiny recurrent model (an LSTM and a linear head, loss on the last
step), trains it one step at a time in the framework's own custom-loop style, and gives
independent ground truth (gradients from autograd / ``tf.GradientTape``, the framework's
own clipping) and inspection (weights, optimizer state, what is attached).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

import gradwatch

T, F, H, B = 7, 3, 5, 4


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

    def _grads(self, model: Any, x: np.ndarray, y: np.ndarray) -> list[Any]:
        keras, tvars = self.keras, model.trainable_variables
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

        loss = mse(torch.as_tensor(y), model(torch.as_tensor(x), training=True))
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
