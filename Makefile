# denoised: one entry point for set-up, build, test and demo. Every target is idempotent.
#
#   make setup   create ./.venv with torch==2.11.0 (libtorch for tch) and the Python test deps
#   make build   release build of the server and client
#   make test    everything CI runs: fmt, clippy, unit + integration + parity tests
#   make demo    start the server on the default model and generate with every cache strategy
#   make install PREFIX=/opt/denoised   movable install: binaries + libtorch, relative rpath

SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements.stamp

# tch's build script finds libtorch through the venv's python (LIBTORCH_USE_PYTORCH=1); the server's
# build.rs embeds an rpath to it, so binaries run without LD_LIBRARY_PATH.
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
export CARGO_TERM_COLOR ?= never

.PHONY: setup build test lint fmt parity-data demo install cache-bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

build: setup
	cargo build --release --workspace

lint: setup
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Tiny random FLUX pipelines in diffusers layout + reference outputs from diffusers itself
# (pipelines, modules, caches), and the CogVideoX parts' references (schedulers, VAE, transformer).
# Rebuilt only when a script or the Python packages change.
PARITY_DATA := tests/parity/data
PARITY_STAMP := $(PARITY_DATA)/.stamp

parity-data: $(PARITY_STAMP)

$(PARITY_STAMP): $(STAMP) $(wildcard tests/parity/*.py)
	$(PY) tests/parity/make_reference.py --out $(PARITY_DATA)
	$(PY) tests/parity/make_cache_reference.py --data $(PARITY_DATA)
	$(PY) tests/parity/make_cogvideox_reference.py --out $(PARITY_DATA)/cogvideox
	$(PY) tests/parity/make_cogvideox_transformer.py --out $(PARITY_DATA)/cogvideox_transformer
	$(PY) tests/parity/make_cogvideox_pipeline_reference.py --out $(PARITY_DATA)/cogvideox_pipeline
	@touch $@

test: setup lint parity-data
	cargo test --workspace --no-fail-fast -- --test-threads=2

TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
DEFAULT_MODEL := models/default

# The shipped model, served and queried with every cache strategy; results in out/.
demo: setup
	cargo build --release -p denoised-server -p denoised-client
	$(PY) scripts/demo.py --server-bin $(TARGET_DIR)/release/denoised \
		--cli-bin $(TARGET_DIR)/release/denoised-cli --model-dir $(DEFAULT_MODEL) --out out

PREFIX ?= /usr/local

# PREFIX/bin/{denoised,denoised-cli} with libtorch beside them in PREFIX/lib/denoised, found
# through $ORIGIN: the tree can be moved or copied into an image as a whole.
install: build
	scripts/install.sh $(PREFIX) $(TARGET_DIR)/release/denoised $(TARGET_DIR)/release/denoised-cli

# Every cache strategy against no cache on one model, interleaved rounds, medians and spread.
BENCH_MODEL ?= $(DEFAULT_MODEL)
BENCH_ARGS ?= 8 64 --repeats 15
cache-bench: setup
	cargo run --release -p denoised-server --example cache_bench -- $(BENCH_MODEL) $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
