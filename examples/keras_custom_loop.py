"""gradwatch with a custom ``tf.GradientTape`` loop: the loop does not change.

``gradwatch.watch(model, optimizer)`` intercepts ``optimizer.apply`` (which
``apply_gradients`` calls), so the gradients are measured and, here, clipped at a fixed
norm inside the compiled step. A GRU learns a running sum; every 10 steps gradwatch
profiles how the gradient spreads over the 30 timesteps.

    python examples/keras_custom_loop.py [--steps 60]
"""

from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keras.utils.set_random_seed(0)

    model = keras.Sequential(
        [keras.Input((30, 2)), keras.layers.GRU(16, name="gru"), keras.layers.Dense(1, name="head")]
    )
    optimizer = keras.optimizers.Adam(1e-2)
    loss_fn = keras.losses.MeanSquaredError()

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(0)
    optimizer.build(model.trainable_variables)
    with gradwatch.watch(model, optimizer, policy="fixed", max_norm=1.0, log_every=20, profile_every=10) as watch:
        for _ in range(args.steps):
            x = rng.standard_normal((32, 30, 2)).astype("float32")
            y = x.sum(axis=(1, 2))[:, None] / 8.0
            loss = train_step(tf.constant(x), tf.constant(y))
        records = watch.records
        clipped = sum(1 for r in records if r.clip is not None and r.clip.clipped)
        last = next(r for r in reversed(records) if r.temporal)
        profile = next(v for k, v in last.temporal.items() if k.endswith("gru"))  # "sequential/gru"
        print(f"steps: {len(records)}  final loss: {float(loss):.4f}  clipped steps: {clipped}")
        print(f"gru at step {last.step}: gain {profile.gain:.3f}, horizon {profile.horizon} of {len(profile.norms)}")
    print("optimizer restored:", "apply" not in vars(optimizer))


if __name__ == "__main__":
    main()
