# mmpipe: `make demo` runs the pipeline on the built-in synthetic data; `make test` runs the tests.
# Both create the project-local virtualenv (.venv) on first use; nothing else to install.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Prefect keeps its database, results and cache records here, not in the user's home.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast bench bench-data lint clean-runs help

help:
	@echo "make demo   - synthetic data + every stage on CPU (runs/demo)"
	@echo "make test   - the test suite"
	@echo "make bench  - benchmarks (see bench/RESULTS.md)"
	@echo "make lint   - ruff (a short rule set, pinned); make test runs it first"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,s3]' 2>&1 \
		| { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	# CLIP_benchmark's metric code (the reference the evaluate tests compare with) needs only
	# torch, tqdm and scikit-learn; its declared requirements would pull open_clip and more.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps clip-benchmark==1.6.2 2>&1 \
		| { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	# open-clip-torch ships OpenAI's real CLIP BPE merges (bpe_simple_vocab_16e6.txt.gz): the
	# fine-tune tests build an OpenAI-layout tokenizer from them offline; no code of it is imported.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0 2>&1 \
		| { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmpipe demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check mmcore mmpipe flows tasks deployments tests bench

test: $(STAMP) lint
	bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b; done

# Real image-text sets for bench/bench_realdata.py (npm packages; rsvg-convert renders OpenMoji's SVGs).
BENCH_DATA := bench/out/data
bench-data: $(STAMP)
	command -v rsvg-convert >/dev/null || { apt-get update -qq && apt-get install -y -qq librsvg2-bin; }
	mkdir -p $(BENCH_DATA)/openmoji $(BENCH_DATA)/noto
	cd $(BENCH_DATA) && test -f openmoji-15.1.0.tgz || npm pack --silent openmoji@15.1.0
	cd $(BENCH_DATA) && test -f emoji-datasource-google-16.0.0.tgz || npm pack --silent emoji-datasource-google@16.0.0
	tar xzf $(BENCH_DATA)/openmoji-15.1.0.tgz -C $(BENCH_DATA)/openmoji package/color/svg package/data/openmoji.json
	tar xzf $(BENCH_DATA)/emoji-datasource-google-16.0.0.tgz -C $(BENCH_DATA)/noto package/img/google/64 package/emoji.json
	$(BIN)/python bench/bench_realdata.py prepare

clean-runs:
	rm -rf runs .prefect
