# vlmlab: two commands for a newcomer.
#   make demo   creates .venv, installs the pinned runtime deps, runs the end-to-end demo
#   make test   installs the dev deps, checks notebooks <-> library sync, runs nbdev_test and pytest
#
# constraints.txt pins every package (torch==2.13.0 included, so a CPU machine takes the CPU wheel
# and never pulls CUDA packages). On a GPU machine, install your own torch build first or pass
#   make demo CONSTRAINTS=
# to let pip choose.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints.txt
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
NBDEV_WORKERS ?= 2
PYTEST_WORKERS ?= 2
export MPLBACKEND := Agg
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo test sync-check nbtest pytest readme bench clean help test-deepspeed

help:
	@echo "make demo   - set up .venv and run the end-to-end demo"
	@echo "make test   - set up dev deps, check notebook/library sync, run nbdev_test and pytest"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(BIN)/python settings.ini setup.py $(CONSTRAINTS)
	$(PIP) install $(PIP_C) -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(PIP) install $(PIP_C) -e ".[dev]"
	@touch $@

demo: $(VENV)/.runtime
	$(BIN)/vlmlab demo --results nbs/demo_results.json

# The notebooks are the source: exporting and cleaning them must change nothing.
sync-check: $(VENV)/.dev
	@before="$$(git status --porcelain; git diff | md5sum)"; \
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && \
	after="$$(git status --porcelain; git diff | md5sum)"; \
	if [ "$$before" != "$$after" ]; then \
	  echo "FAIL: nbdev_export / nbdev_clean changed files: vlmlab/ is out of sync with nbs/ or a notebook is not clean:"; \
	  git status --short; exit 1; fi; \
	if [ -n "$$CI" ] && [ -n "$$(git status --porcelain)" ]; then \
	  echo "FAIL (CI): the clean clone is not clean after export:"; git status --short; exit 1; fi; \
	$(BIN)/python tools/readme.py --check
	@echo "sync-check: notebooks, library and README agree"

nbtest: $(VENV)/.dev
	$(BIN)/nbdev_test --n_workers $(NBDEV_WORKERS) --timing

pytest: $(VENV)/.dev
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests   # pytest-xdist: one test process (one thread) per core

test: sync-check nbtest pytest

readme: $(VENV)/.dev
	$(BIN)/python tools/readme.py

# Benchmarks: ratios measured side by side in one run, written to benchmarks/results.json and benchmarks/RESULTS.md;
# not part of `make test` (tests/test_bench.py runs the --quick smoke test). BENCH_ARGS=--quick for small sizes.
# trl is a benchmark-only dependency (bench_packing compares against its BFD packing).
BENCH_ARGS ?=
bench: $(VENV)/.runtime
	$(PIP) install $(PIP_C) trl==1.16.0
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info _proc _docs

# The reliability page (nbs/95_reliability.ipynb) renders nbs/reliability_results.json: this runs tests/reliability plus the
# existing tests its table cites and rewrites that file (make test runs the same suite but never writes it).
.PHONY: reliability-report
reliability-report: $(VENV)/.dev
	VLMLAB_RELIABILITY_REPORT=nbs/reliability_results.json $(BIN)/python -m pytest -q -p no:cacheprovider tests/reliability \
	  $$($(BIN)/python tests/reliability/reliability_kit.py)

# The docs site without Quarto (not installable here): nbdev's processors, then nbconvert, into _docs/ (open
# _docs/index.html). tests/test_docs.py builds the same into a temporary folder and checks it in headless Chromium.
# Where Quarto exists, `nbdev_docs` builds the real site from the same notebooks and nbs/_quarto.yml.
.PHONY: docs
docs: $(VENV)/.dev
	$(BIN)/python tools/docs.py --out _docs

# The prepared GPU check (benchmarks/gpu_check.py): on a GPU, packed == solo in bf16 per family and attention, packed vs
# padded tokens/s and peak memory at a real model size (LoRA and full), the trainer page's `gpu` cells; results to
# benchmarks/results/gpu.json. Without a GPU it says so and dry-runs the same code on CPU (make test runs that).
.PHONY: gpu-check
gpu-check: $(VENV)/.dev
	$(BIN)/python benchmarks/gpu_check.py

# DeepSpeed is not a dependency (an sdist built against the installed torch): this installs it and runs the ZeRO-2 / ZeRO-3
# tests of tests/test_distributed.py, which make test skips without it (2 CPU processes over gloo; on GPUs, NCCL)
test-deepspeed: $(VENV)/.dev
	DS_BUILD_OPS=0 $(PIP) install $(PIP_C) --no-build-isolation deepspeed==0.19.8 hjson ninja py-cpuinfo msgpack
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests/test_distributed.py -k deepspeed
