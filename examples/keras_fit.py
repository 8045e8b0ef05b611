"""gradwatch with Keras ``model.fit``: one callback, nothing else changes.

The task needs memory: the target is the first value of a 40-step sequence, so the
gradient must travel back 40 timesteps. gradwatch's per-timestep profile shows how much
of it arrives (``gain``, ``horizon``) and the ZClip policy clips spikes in-graph.

    python examples/keras_fit.py [--epochs 3] [--out runs/]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from gradwatch_tf import GradWatchCallback


def make_data(n: int, timesteps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, timesteps, 1)).astype("float32")
    return x, x[:, :1, 0].copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--timesteps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    keras.utils.set_random_seed(0)

    x, y = make_data(args.samples, args.timesteps)
    model = keras.Sequential(
        [keras.Input((args.timesteps, 1)), keras.layers.LSTM(32, name="lstm"), keras.layers.Dense(1, name="head")]
    )
    model.compile(keras.optimizers.Adam(1e-2), "mse", steps_per_execution=2)

    args.out.mkdir(parents=True, exist_ok=True)
    run = args.out / "keras_fit.jsonl"
    cb = GradWatchCallback(policy="zclip", profile_every=5, log_every=10, sinks=["logging", f"jsonl:{run}"])
    history = model.fit(x, y, batch_size=32, epochs=args.epochs, verbose=2, callbacks=[cb])

    last = next(r for r in reversed(cb.records) if r.temporal)
    profile = next(v for k, v in last.temporal.items() if k.endswith("lstm"))  # "sequential/lstm"
    print(f"steps: {len(cb.records)}  grad_norm per epoch: {[round(v, 4) for v in history.history['grad_norm']]}")
    print(
        f"lstm at step {last.step}: gain {profile.gain:.3f} per timestep, horizon {profile.horizon} of {len(profile.norms)}"
    )
    print("largest singular values:", {k.split("/")[-1]: round(v, 3) for k, v in last.spectral.items()})
    print(f"events: {len(cb.events)}; run file: {run}")
    cb.close()


if __name__ == "__main__":
    main()
