# Every target sets itself up: torch is pinned and installed first (the CPU wheel here; an
# unpinned torch would pull GBs of CUDA packages), then the package with its extras.
PY ?= python3
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,regroup,hf,bench,demo,faiss
STAMP := .setup-stamp
PYTEST_ARGS ?=
# COV=1: line and branch coverage of the core (ops, tracking, mixing, sampling, balancer).
COV ?= 0
COV_ARGS := --cov --cov-report=term
OUT ?= out/demo
DEMO_ARGS ?=

.PHONY: setup data test test-fast lint format bench demo mutation replant clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)" -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)

# The real corpora the tests and the demo use: Debian fortunes (apt) and Natural Instructions v1
# (the BIG-bench 1.0.0 sdist, 358 MB, fetched with pip into $$RNB_CACHE or ~/.cache/rnb_kernels).
# Without them the corpus tests skip -- and fail under RNB_STRICT=1, as CI runs them.
data: setup
	@if [ ! -d /usr/share/games/fortunes ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes fortunes-min >/dev/null; \
	  else echo "fortunes corpus missing and apt-get unavailable: corpus tests will skip"; fi; \
	fi
	@$(PY) -c "from rnb_kernels.datasets import bigbench_tarball as t; print('NI v1 archive:', t())" \
	  || echo "BIG-bench archive unavailable: the Natural Instructions test will skip"

test: setup data
	$(PY) -m pytest -q $(if $(filter 1,$(COV)),$(COV_ARGS)) $(PYTEST_ARGS) tests

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Natural Instructions v1 (fetched into ~/.cache/rnb_kernels with pip on first use), target shift:
# regroup, then train the same GPT-Neo under Stratified, the oracle, DGA and R&B over 3 seeds and
# print the table (intervals, gap closed); plots and logs in $(OUT). ~10 minutes on 2 idle cores.
# DEMO_ARGS=--in-distribution for the in-distribution scenario.
demo: setup data
	$(PY) -m rnb_kernels.cli demo --out $(OUT) $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/bench_kernels.py --quick

clean:
	rm -rf build *.egg-info $(STAMP) rnb_kernels/_C*.so rnb_kernels/_cpu*.so .pytest_cache .ruff_cache

# Mutation testing of the core (not part of CI: hours on 2 cores for every module). mutmut runs,
# per mutant, only the selected tests that reach the mutated code ([tool.mutmut] in
# pyproject.toml); MODULES narrows the run, e.g. MODULES="rnb_kernels.mixing.rnb.*".
MODULES ?= rnb_kernels.mixing.rnb.* rnb_kernels.mixing.dga.* rnb_kernels.mixing.odm.* \
	rnb_kernels.mixing.base.* rnb_kernels.mixing.registry.* rnb_kernels.mixing.static.* \
	rnb_kernels.mixing.stratified.* rnb_kernels.ops.sketch_hash.* rnb_kernels.ops.reference.* \
	rnb_kernels.tracking.ids.* rnb_kernels.sampling.* rnb_kernels.balancer.* \
	rnb_kernels.tracking.linear.* rnb_kernels.tracking.slot.* rnb_kernels.tracking.tracker.*
mutation: setup replant
	$(PY) -m pip install --quiet --disable-pip-version-check "mutmut==3.8.1"
	rm -rf mutants
	$(PY) -m mutmut run --max-children 2 $(foreach m,$(MODULES),'$(m)') || true
	$(PY) benchmarks/mutation_report.py --out benchmarks/results/mutation.md

# Planted faults (benchmarks/replant.py): faults an audit once planted unnoticed, and the mutmut
# survivors only multi-process tests or a warning's line can kill; each must make its tests
# fail (report: benchmarks/results/replant.md, which the mutation report reads). ~5 minutes on
# 2 cores; CI runs it.
replant: setup data
	$(PY) benchmarks/replant.py
