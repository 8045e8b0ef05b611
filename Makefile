# make demo  - create .venv if missing, install gradwatch with PyTorch (CPU) and plotting, run the demo
# make report - gradwatch report on the demo's run files (or RUNS="a.jsonl b.jsonl"), into gradwatch-report/
# make test  - create .venv if missing, install everything the suite needs, run the whole suite
# make bench - run the benchmarks and write benchmarks/RESULTS.md
#
# CPU builds are pinned in constraints-test.txt (torch==2.13.0 is the CPU wheel; any other
# torch version pulls a multi-GB CUDA build). The library's own requirements are ranges
# in pyproject.toml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints-test.txt
STAMP_DEMO := $(VENV)/.gradwatch-demo
STAMP_TEST := $(VENV)/.gradwatch-test
FLA_DIR    := $(VENV)/fla-triton

.PHONY: demo report test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP_DEMO): pyproject.toml constraints-test.txt | $(BIN)/python
	$(PIP) -e '.[torch,plot]'
	touch $@

$(STAMP_TEST): pyproject.toml constraints-test.txt | $(BIN)/python
	$(PIP) -e '.[torch,tf,jax,plot,dev,lightning,transformers,modern]'
	# flash-linear-attention (GLA, HGRN, RWKV-6; tests/torch/test_fla.py) imports triton at import
	# time (286 MB download, 1 GB installed; no GPU needed: the tests swap its kernels for fla's
	# torch references). Installed beside the venv, not in it: triton's LLVM aborts a process that
	# has loaded TensorFlow's ("Option 'bitcode-mdindex-threshold' registered more than once"),
	# and torch.optim imports triton whenever it is installed; only the fla suite puts it on its
	# path (tests/run_suites.py). Pinned: the adapters read fla 0.6.0's layers.
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --target $(FLA_DIR) \
		flash-linear-attention==0.6.0 fla-core==0.6.0 triton==3.9.0
	# recurrentgemma (RG-LRU) without its dependencies: it pins numpy<2.4 and absl-py<2 for
	# its JAX half, which the tests never import; its torch layers need only jaxtyping.
	$(PIP) --no-deps recurrentgemma==1.0.1 jaxtyping==0.3.11 wadler-lindig==0.1.8
	touch $@ $(STAMP_DEMO)

demo: $(STAMP_DEMO)
	$(BIN)/gradwatch demo

RUNS ?= gradwatch-demo/*.jsonl
report: $(STAMP_DEMO)
	$(BIN)/gradwatch report $(RUNS) --out gradwatch-report

# Each suite runs in its own process (tests/run_suites.py says why), two suites at a time:
# the core with torch, TensorFlow and Keras made unimportable (it must work from numpy
# alone), torch, the CLI, the examples, the benchmarks' smoke test, the backend contract
# suite (tests/contract) once per backend, and Keras once per Keras backend: the whole of
# tests/tf and the contract on TensorFlow; on JAX and torch the suites written for every
# backend (KERAS_ANY_BACKEND) and the contract, through time included (the keras.ops replay
# and, on torch, its estimate's accuracy above dim 16), less on JAX the slowest tests (eager
# JAX: reference gradients; of through time the bidirectional and masked cases only).
KERAS_ANY_BACKEND := tests/tf/test_keras_backends.py tests/tf/test_tf_fit_exits.py tests/tf/test_keras_step_cost.py \
	tests/tf/test_keras_live_facts.py tests/tf/test_keras_replay_cost.py tests/tf/test_keras_batch_logs.py \
	tests/tf/test_keras_spectral.py tests/tf/test_keras_sensitivity.py tests/tf/test_keras_dropout.py \
	tests/tf/test_keras_numpy_replay.py tests/tf/test_keras_mingru.py
KERAS_CONTRACT_torch := not profiling_schedule
KERAS_CONTRACT_jax := records_match or close_leaves or bitwise or raise_happens or fixed_equals or header or (float64_reference and (bidirectional or masked))
test: $(STAMP_TEST)
	GRADWATCH_FLA_PATH="$(FLA_DIR)" KERAS_ANY_BACKEND="$(KERAS_ANY_BACKEND)" KERAS_CONTRACT_torch="$(KERAS_CONTRACT_torch)" \
	KERAS_CONTRACT_jax="$(KERAS_CONTRACT_jax)" $(BIN)/python tests/run_suites.py

bench: $(STAMP_TEST)
	$(PIP) -e '.[torch,tf,plot,dev,lightning,transformers,modern,bench]'
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis gradwatch-demo gradwatch-report
