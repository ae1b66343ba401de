# Every target sets itself up: torch is pinned and installed first (the CPU wheel here; an
# unpinned torch would pull GBs of CUDA packages), then the package with its extras.
PY ?= python3
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,regroup,hf,bench,demo
STAMP := .setup-stamp
PYTEST_ARGS ?=
OUT ?= out/demo
DEMO_ARGS ?=

.PHONY: setup data test test-fast lint format bench demo clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)" -e ".[$(EXTRAS)]"
	@touch $(STAMP)

setup: $(STAMP)

# The real corpora the tests and the demo use: Debian fortunes (apt) for tests. Needs root; if
# apt is unavailable the corpus tests skip and say why.
data:
	@if [ ! -d /usr/share/games/fortunes ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes fortunes-min >/dev/null; \
	  else echo "fortunes corpus missing and apt-get unavailable: corpus tests will skip"; fi; \
	fi

test: setup data
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

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
	rm -rf build *.egg-info $(STAMP) rnb_kernels/_C*.so .pytest_cache .ruff_cache
