"""Keras 3 overhead: ``model.fit`` with gradwatch's callback against an unwatched fit.

Input(100, 64) -> LSTM(256) -> Dense(10), sparse categorical cross-entropy, Adam, batch 32.
Arms: unwatched; ``global_clipnorm=1.0``; ``GradWatchCallback()`` (defaults);
``GradWatchCallback(profile_every=1)``. Each arm owns its own model (same initial
weights) and calls ``fit`` once per round on the same data, ``verbose=0``.

Steps are timed by a per-batch timer callback that every arm carries, placed last in the
callback list: a step's time is the interval between two consecutive
``on_train_batch_end`` calls, so it holds the train function and every callback's
per-batch work, and the first batch of each ``fit`` (where tracing happens) is not a
step time. The first-batch cost is reported separately: for every fit after the
warm-up one, the first batch of a watched fit against the unwatched arm's (target: at
most ``FIRST_BATCH_TARGET`` times, i.e. a later fit of the same compiled model does not
retrace).

``python -m benchmarks.keras_bench [--quick] [--json PATH]``;
``python -m benchmarks.keras_bench --first-batch [--quick] [--fits N]`` measures only that
(a few fits per arm, interleaved; prints one line per arm).
``KERAS_BACKEND=jax|torch|tensorflow python -m benchmarks.keras_bench --backend-ratios``:
on whichever backend, a smaller LSTM's steady step and first fit, defaults against
unwatched (:func:`backend_ratios`).
``KERAS_BACKEND=... python -m benchmarks.keras_bench --replay-cost``: CPU time of one
through-time replay (``gradwatch_tf._kreplay.measure``) of LSTM(256) over 100 steps, 8
sequences, compiled as the backend's training step would hold it (:func:`replay_cost`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep torch out of this process, as a TensorFlow Keras user's would be.
if os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow":
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]

import numpy as np

from benchmarks.harness import Arm, Workload, emit, logger, run_interleaved, summarize

log = logger("keras")

TARGETS = {"GradWatchCallback defaults": 1.05, "GradWatchCallback profile_every=1": 1.10}
#: The first batch of a later fit (same model, optimizer, compilation), watched over unwatched.
FIRST_BATCH_TARGET = 2.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--rounds", type=int)
    p.add_argument("--first-batch", action="store_true", help="measure only the first batch of later fits")
    p.add_argument("--fits", type=int, default=5, help="fits per arm with --first-batch (the first is warm-up)")
    p.add_argument("--backend-ratios", action="store_true", help="steady step and first fit on KERAS_BACKEND")
    p.add_argument("--replay-cost", action="store_true", help="CPU time of one replay of LSTM(256), T=100")
    p.add_argument("--early-fits", action="store_true", help="whole fits of a fit's first steps, before any lean switch")
    a = p.parse_args(argv)
    if a.early_fits:
        early_fits(rounds=a.rounds or 8)
        return
    if a.replay_cost:
        replay_cost(rounds=a.rounds or 10)
        return
    if a.backend_ratios:
        backend_ratios(quick=a.quick, rounds=a.rounds or (2 if a.quick else 5))
        return

    import keras
    import tensorflow as tf

    import gradwatch  # noqa: F401
    from gradwatch_tf import GradWatchCallback

    if a.quick:
        seq, feat, hidden, classes, batch, steps, rounds, warm_fits = 8, 4, 8, 3, 4, 10, 2, 1
    else:
        seq, feat, hidden, classes, batch, steps, rounds, warm_fits = 100, 64, 256, 10, 32, 10, 10, 1
    if a.rounds:
        rounds = a.rounds
    if a.first_batch:
        steps = 2  # the first batch is what is measured; a couple more make it a fit
    # One fit per arm per round: steps + 1 batches (the first one is not timed).
    n = batch * (steps + 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, seq, feat)).astype("float32")
    y = rng.integers(0, classes, size=(n,)).astype("int32")

    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((seq, feat)), keras.layers.LSTM(hidden), keras.layers.Dense(classes)])
    weights = base.get_weights()

    class BatchTimer(keras.callbacks.Callback):
        """Time between consecutive batch ends; first batch of a fit recorded apart."""

        def __init__(self) -> None:
            super().__init__()
            self.steps: list[float] = []
            self.first: list[float] = []
            self._t = 0.0
            self._t0 = 0.0

        def on_train_begin(self, logs: Any = None) -> None:
            self._t0 = time.perf_counter()
            self._t = 0.0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            now = time.perf_counter()
            if self._t:
                self.steps.append(now - self._t)
            else:
                self.first.append(now - self._t0)
            self._t = now

    def make(name: str, clipnorm: float | None, cb_options: dict[str, Any] | None, note: str) -> Arm:
        model = keras.Sequential([keras.Input((seq, feat)), keras.layers.LSTM(hidden), keras.layers.Dense(classes)])
        model.set_weights(weights)
        opt = keras.optimizers.Adam(1e-3, global_clipnorm=clipnorm) if clipnorm else keras.optimizers.Adam(1e-3)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        timer = BatchTimer()
        callbacks: list[Any] = []
        watch = None
        if cb_options is not None:
            watch = GradWatchCallback(**cb_options)
            callbacks.append(watch)
        callbacks.append(timer)  # last: its batch end comes after every other callback's

        def run(k: int) -> list[float]:
            # k is a number of timed steps; one fit covers `steps` timed steps.
            out: list[float] = []
            while len(out) < k:
                timer.steps.clear()
                model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
                out += timer.steps
            return out

        def close() -> None:
            if watch is not None:
                watch.close()

        arm = Arm(name, run, close, TARGETS.get(name), note)
        arm.timer = timer  # type: ignore[attr-defined]
        return arm

    if a.first_batch:
        first_batch_only(
            [make("unwatched", None, None, ""), make("GradWatchCallback defaults", None, {}, "")],
            lambda arm: arm.run(1),
            fits=max(a.fits, 2),
        )
        return

    arms = [
        make("unwatched", None, None, ""),
        make("global_clipnorm", 1.0, None, "Adam(global_clipnorm=1.0)"),
        make("GradWatchCallback defaults", None, {}, "all defaults: sinks=['logging'], profile_every=10"),
        make("GradWatchCallback profile_every=0", None, {"profile_every": 0}, "diagnostic: norms only"),
        make("GradWatchCallback profile_every=1", None, {"profile_every": 1}, "otherwise defaults"),
    ]
    log(f"{len(arms)} arms, {rounds} rounds x {steps} steps (one fit each), warm-up {warm_fits} fit")
    t0 = time.perf_counter()
    try:
        times, _ = run_interleaved(arms, rounds=rounds, steps=steps, warmup=steps * warm_fits, log=log)
    finally:
        for arm in arms:
            arm.close()
    results = [summarize(arm, times) for arm in arms]
    for res in results:
        log(f"{res.name:36s} median {res.median:.3f} [{res.min:.3f}, {res.max:.3f}]")
    base_first = statistics.median(arms[0].timer.first[warm_fits:])  # type: ignore[attr-defined]
    first = {
        arm.name: statistics.median(arm.timer.first[warm_fits:]) / base_first  # type: ignore[attr-defined]
        for arm in arms
    }
    later = first["GradWatchCallback defaults"]
    extra = {
        "first batch of each fit (tracing included), median ratio to unwatched's": ", ".join(
            f"{k} {v:.2f}" for k, v in first.items()
        ),
        f"first batch of a later fit, GradWatchCallback defaults / unwatched (target <= {FIRST_BATCH_TARGET:g})": (
            f"{later:.2f} ({'met' if later <= FIRST_BATCH_TARGET else 'NOT met'})"
        ),
        "first batch of each fit, unwatched, absolute": f"{base_first:.2f} s",
    }
    desc = (
        f"`fit` of Input({seq}, {feat}) -> LSTM({hidden}) -> Dense({classes}), batch {batch}, Adam, "
        f"verbose=0; {steps} timed steps per fit (one fit per arm per round)."
    )
    wl = Workload("Keras fit", desc, rounds, steps, steps * warm_fits, results, extra)
    emit(
        a.json,
        {
            "bench": "keras",
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "threads": {
                "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            },
            "seconds": time.perf_counter() - t0,
            "workloads": [wl],
        },
    )


def first_batch_only(arms: list[Arm], fit_once: Any, fits: int) -> None:
    """First-batch time of each fit, arms interleaved fit by fit; the first fit of each
    arm (the trace) is left out. Prints the median of the later fits and the ratio."""
    for i in range(fits):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            fit_once(arm)
    base = statistics.median(arms[0].timer.first[1:])  # type: ignore[attr-defined]
    for arm in arms:
        firsts = arm.timer.first  # type: ignore[attr-defined]
        later = statistics.median(firsts[1:])
        log(
            f"{arm.name:28s} first fit {firsts[0]:.3f} s; later fits: median {later:.3f} s "
            f"[{min(firsts[1:]):.3f}, {max(firsts[1:]):.3f}], ratio {later / base:.2f}"
        )
    ratio = statistics.median(arms[1].timer.first[1:]) / base  # type: ignore[attr-defined]
    log(
        f"first batch of a later fit, watched / unwatched: {ratio:.2f} (target <= {FIRST_BATCH_TARGET:g}: "
        f"{'met' if ratio <= FIRST_BATCH_TARGET else 'NOT met'})"
    )
    for arm in arms:
        arm.close()


def backend_ratios(quick: bool, rounds: int) -> None:
    """Input(50, 16) -> LSTM(64) -> Dense(1), MSE, Adam, batch 32, 8 steps per fit, on
    ``KERAS_BACKEND``. Steady step: median over fits of the median batch-end interval
    (first batch excluded), GradWatchCallback() against unwatched, fits interleaved. First
    fit: a fresh model's first ``fit`` (compile and trace included), watched against
    unwatched, interleaved over ``rounds`` fresh pairs. Prints ratios."""
    import keras

    from gradwatch_tf import GradWatchCallback

    seq, feat, hidden, batch, steps = (8, 4, 8, 4, 4) if quick else (50, 16, 64, 32, 8)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps, seq, feat)).astype("float32")
    y = rng.standard_normal((batch * steps, 1)).astype("float32")

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.t, self.steps = 0.0, []

        def on_train_batch_end(self, b: int, logs: Any = None) -> None:
            now = time.perf_counter()
            if self.t:
                self.steps.append(now - self.t)
            self.t = now

    def fresh() -> Any:
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((seq, feat)), keras.layers.LSTM(hidden), keras.layers.Dense(1)])
        m.compile(keras.optimizers.Adam(1e-3), "mse")
        return m

    def fit(model: Any, cbs: list[Any], epochs: int = 1) -> float:
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=cbs)
        return time.perf_counter() - t0

    try:  # JAX compiles the host's through-time replay in the background (gradwatch_tf._kkept)
        from gradwatch_tf._kkept import compiles_done
    except ImportError:  # code before that
        compiles_done = None  # type: ignore[assignment]

    # On TensorFlow the callback builds the optimizer before the fit, so that Keras traces
    # the step once instead of twice (gradwatch_tf.callback._build_optimizer): the third
    # arm, unwatched with its optimizer built the same way, is the like-for-like baseline.
    names = ("unwatched", "defaults") + (("built",) if keras.backend.backend() == "tensorflow" else ())
    first: dict[str, list[float]] = {name: [] for name in names}
    after: list[float] = []  # the background compile still running when the watched fit returned
    for i in range(rounds):  # first fits of fresh models, interleaved
        for name in names if i % 2 == 0 else names[::-1]:
            cbs = [GradWatchCallback(sinks=["memory"])] if name == "defaults" else []
            model = fresh()
            if name == "built":
                model.optimizer.build(model.trainable_variables)
            first[name].append(fit(model, cbs))
            if name == "defaults" and compiles_done is not None:  # never overlapping the next arm
                t0 = time.perf_counter()
                compiles_done()
                after.append(time.perf_counter() - t0)
    models = {name: fresh() for name in ("unwatched", "defaults")}
    cbs = {"unwatched": [Timer()], "defaults": [GradWatchCallback(sinks=["memory"]), Timer()]}
    steady: dict[str, list[float]] = {"unwatched": [], "defaults": []}
    mean: dict[str, list[float]] = {"unwatched": [], "defaults": []}  # profiled steps included
    for name, model in models.items():  # warm-up fit (the trace)
        fit(model, cbs[name])
        if compiles_done is not None:
            compiles_done()
    lean = ""
    if keras.backend.backend() in ("tensorflow", "jax"):
        # TensorFlow and JAX trace a lean train function once the time it would have saved
        # pays for the trace (gradwatch_tf.callback.LEAN_SAVING, LEAN_SAVING_JAX): warm up
        # until it has, as a long fit does.
        watch = cbs["defaults"][0]
        before = watch.watch.monitor.next_step
        for epochs in (50, 100, 200, 400):
            if getattr(watch._functions, "_lean", None) is not None:
                break
            fit(models["defaults"], cbs["defaults"], epochs)
            fit(models["unwatched"], cbs["unwatched"], epochs)
        took = watch.watch.monitor.next_step - before
        if getattr(watch._functions, "_lean", None) is not None:
            lean = f" (the lean train function in use after a warm-up of {took} steps)"
        else:
            lean = f" (no lean train function after a warm-up of {took} steps)"
    for i in range(rounds * 3):
        for name in ("unwatched", "defaults") if i % 2 == 0 else ("defaults", "unwatched"):
            fit(models[name], cbs[name])
            steady[name].append(statistics.median(cbs[name][-1].steps))
            mean[name].append(statistics.mean(cbs[name][-1].steps))
    s_ratio = statistics.median(steady["defaults"]) / statistics.median(steady["unwatched"])
    m_ratio = statistics.median(mean["defaults"]) / statistics.median(mean["unwatched"])
    f_ratio = statistics.median(first["defaults"]) / statistics.median(first["unwatched"])
    bg = f", then the background compile {statistics.median(after):.2f} s more" if after else ""
    if "built" in first:
        like = statistics.median(first["defaults"]) / statistics.median(first["built"])
        bg += f"; against an unwatched fit whose optimizer was built before (traced once, as the watched one): {like:.2f}"
    log(
        f"keras-{keras.backend.backend()}: steady step {statistics.median(steady['unwatched']) * 1e3:.1f} ms unwatched, "
        f"defaults / unwatched {s_ratio:.3f}{_spread(steady['defaults'], steady['unwatched'], 3)} (mean step, "
        f"profiled ones included: {m_ratio:.3f}); first fit {statistics.median(first['unwatched']):.2f} s unwatched, "
        f"defaults / unwatched {f_ratio:.2f}{_spread(first['defaults'], first['unwatched'], 2)}{bg}{lean}"
    )


def early_fits(rounds: int) -> None:
    """The cost of a fit's first steps on ``KERAS_BACKEND``, before the lean train function
    (TensorFlow, JAX) has paid for its trace: whole fits of 3 epochs of 64 steps (the
    callback's begin and end included, profiled steps included), after one warm-up fit, Input(50, 16) -> LSTM(64)
    -> Dense(1), Adam, batch 32, arms interleaved over ``rounds``: unwatched, the defaults,
    ``profile_every=1000`` (step 1 profiled, then the full step function's per-step cost
    alone) and ``profile_every=0`` (no through-time work). Prints medians' ratios."""
    import keras

    from gradwatch_tf import GradWatchCallback

    seq, feat, hidden, batch, steps = 50, 16, 64, 32, 64
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * steps, seq, feat)).astype("float32")
    y = rng.standard_normal((batch * steps, 1)).astype("float32")
    arms: dict[str, dict[str, Any] | None] = {
        "unwatched": None,
        "defaults": {},
        "profile_every=1000": {"profile_every": 1000},
        "profile_every=0": {"profile_every": 0},
    }
    models, cbs = {}, {}
    for name, opts in arms.items():
        keras.utils.set_random_seed(0)
        models[name] = keras.Sequential([keras.Input((seq, feat)), keras.layers.LSTM(hidden), keras.layers.Dense(1)])
        models[name].compile(keras.optimizers.Adam(1e-3), "mse")
        cbs[name] = [] if opts is None else [GradWatchCallback(sinks=["memory"], **opts)]
        models[name].fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=cbs[name])  # the trace
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(rounds):
        for name in list(arms) if i % 2 == 0 else list(arms)[::-1]:
            t0 = time.perf_counter()
            models[name].fit(x, y, batch_size=batch, epochs=3, verbose=0, callbacks=cbs[name])
            times[name].append(time.perf_counter() - t0)
    lean = [name for name in arms if cbs[name] and getattr(cbs[name][0]._functions, "_lean", None) is not None]
    base = statistics.median(times["unwatched"])
    log(
        f"keras-{keras.backend.backend()} early fits ({rounds} fits of {3 * steps} steps per arm after a warm-up fit; "
        f"a fit {base:.2f} s unwatched; lean function traced in: {', '.join(lean) or 'none'}): "
        + ", ".join(
            f"{name} {statistics.median(t) / base:.3f}{_spread(t, times['unwatched'], 3)}"
            for name, t in times.items()
            if name != "unwatched"
        )
    )


def _spread(watched: list[float], unwatched: list[float], digits: int) -> str:
    """The range of the per-round ratios beside their medians' ratio: on a shared machine
    one round's ratio moves by +-10% (load), so a version is better only past that range."""
    ratios = [w / u for w, u in zip(watched, unwatched) if u > 0]
    return f" [rounds {min(ratios):.{digits}f}-{max(ratios):.{digits}f}]" if len(ratios) > 1 else ""


def replay_cost(rounds: int) -> None:
    """One replay of LSTM(256) over 100 steps, 8 sequences (the dense estimate: dim 512),
    on ``KERAS_BACKEND``: inside ``tf.function`` on TensorFlow (one thread, as a replay
    traced into the step runs beside nothing), ``jax.jit`` on JAX, eager on torch. CPU
    time (``time.process_time``): the first call (trace, graph optimisation or compile)
    and the median of ``rounds`` later calls, each with a new seed. Prints one line."""
    import keras

    from gradwatch_tf._kreplay import measure

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    layer = keras.layers.LSTM(256)
    x = np.random.default_rng(0).standard_normal((8, 100, 32)).astype("float32")
    layer(x)

    def run(xs: Any, seed: Any) -> Any:
        return measure(layer.cell, xs, None, None, backwards=False, seed=seed)[0]

    if backend == "tensorflow":
        fn = tf.function(run)
    elif backend == "jax":
        import jax

        fn = jax.jit(run)
    else:
        fn = run
    cpu = []
    for i in range(rounds + 1):
        t0 = time.process_time()
        np.asarray(keras.ops.convert_to_numpy(fn(x, np.int32(i))))
        cpu.append(time.process_time() - t0)
    log(
        f"keras-{backend}: replay of LSTM(256), T=100, 8 sequences: first call {cpu[0]:.2f} s CPU, "
        f"then {statistics.median(cpu[1:]) * 1e3:.1f} ms CPU (median of {rounds}); "
        f"load {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
