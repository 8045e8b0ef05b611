"""Run every test suite of `make test`, each in its own process, on two lanes at once.

Why processes: the core must work from numpy alone (torch, TensorFlow and Keras are made
unimportable for it), the two frameworks are not loaded into one process (users do not,
and it only slows the run), and Keras runs once per backend (KERAS_BACKEND is read at
import). Why two lanes: most of the suite is single-threaded Python (Keras tracing, small
models), so on a 2-core machine two suites side by side take about the time of the longer
lane instead of the sum. Each suite's output is printed whole when it ends, with its wall
time, so the log reads in order; the exit status is 1 if any suite failed.

The Makefile passes the Keras subsets through the environment (KERAS_ANY_BACKEND,
KERAS_CONTRACT_jax, KERAS_CONTRACT_torch), so the choice of what runs on the extra Keras
backends stays in one visible place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _suites() -> list[list[tuple[str, dict[str, str], list[str]]]]:
    any_backend = os.environ.get("KERAS_ANY_BACKEND", "tests/tf/test_keras_backends.py").split()
    contract = {b: os.environ.get(f"KERAS_CONTRACT_{b}", "") for b in ("jax", "torch")}

    def keras(backend: str) -> list[tuple[str, dict[str, str], list[str]]]:
        picked = ["-k", contract[backend]] if contract[backend] else []
        return [
            (f"Keras on {backend}", {"KERAS_BACKEND": backend}, any_backend),
            (f"contract, Keras on {backend}", {"KERAS_BACKEND": backend}, ["tests/contract", "--backend", "keras", *picked]),
        ]

    tf = {"KERAS_BACKEND": "tensorflow"}
    # flash-linear-attention and triton live beside the venv (the Makefile says why): only this
    # suite has them on its path, so tests/torch/test_fla.py skips in the torch suite and runs here.
    fla = os.environ.get("GRADWATCH_FLA_PATH", "")
    fla_suite = []
    if fla:
        path = os.pathsep.join(p for p in (str(ROOT / fla) if not os.path.isabs(fla) else fla, os.environ.get("PYTHONPATH", "")) if p)
        fla_suite = [("torch: flash-linear-attention (triton on the path)", {**tf, "PYTHONPATH": path}, ["tests/torch/test_fla.py"])]
    lane_a = [
        ("core (no framework importable)", {"GRADWATCH_BLOCK_FRAMEWORKS": "1"}, ["tests/core"]),
        ("torch", tf, ["tests/torch"]),
        *fla_suite,
        ("contract, torch", tf, ["tests/contract", "--backend", "torch"]),
        ("cli", tf, ["tests/cli"]),
        ("examples", tf, ["tests/examples"]),
        ("benchmarks (smoke)", tf, ["tests/benchmarks"]),
    ]
    lane_b = [
        ("Keras on tensorflow", tf, ["tests/tf"]),
        ("contract, Keras on tensorflow", tf, ["tests/contract", "--backend", "keras"]),
        *keras("jax"),
        *keras("torch"),
    ]
    return [lane_a, lane_b]


_print_lock = threading.Lock()


def _lane(suites: list[tuple[str, dict[str, str], list[str]]], failed: list[str]) -> None:
    for name, env, args in suites:
        paths = [a for a in args if a.startswith("tests/")]
        if not all((ROOT / p.split("::")[0]).exists() for p in paths):
            continue
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", *args, "-q"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        took = time.monotonic() - start
        with _print_lock:
            verdict = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"\n===== {name}: {verdict}, {took:.0f} s =====", flush=True)
            print(proc.stdout, end="", flush=True)
            if proc.returncode != 0:  # 5 (nothing collected) too: a subset that selects nothing is a mistake
                failed.append(name)


def main() -> int:
    start = time.monotonic()
    failed: list[str] = []
    lanes = [threading.Thread(target=_lane, args=(lane, failed)) for lane in _suites()]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    print(f"\n===== all suites: {time.monotonic() - start:.0f} s; failed: {', '.join(failed) or 'none'} =====")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
