# `make test` is the one command that runs everything CI runs (.ci/run calls it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: bench test deps venv edge-native firmware-unix lint typecheck pytest demo wasm clean

test: deps venv edge-native firmware-unix lint typecheck pytest

deps:
	@tools/install-system-deps.sh
	@tools/install-podman.sh        # podman's Docker API service + a local busybox image
	@tools/install-bubblewrap.sh    # the native executor's sandbox
	@tools/install-image-deps.sh    # qemu, busybox, syslinux, mtools: the image tests

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# MicroPython nodes: the wasm3-run job runner (C, from pywasm3's source package) and
# micropython-lib's umqtt.simple; both cached, both instant when up to date.
edge-native: venv
	PATH="$(abspath $(BIN)):$$PATH" tools/build-wasm3-runner.sh
	$(BIN)/python tools/fetch-umqtt.py

# The DEparrow firmware for MicroPython's unix port (firmware/build.sh --unix): MicroPython
# 1.27 from ../shared/vendor's source tarball with the node frozen in and the dpwasm3 engine
# compiled in, the binary the MicroPython tests run. Cached outside the clone, keyed by its
# inputs: instant when up to date, about a minute on 2 cores when not.
firmware-unix: venv
	PYTHON="$(abspath $(BIN))/python" firmware/build.sh --unix

venv: $(VENV)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

demo: venv
	$(BIN)/deparrow demo

wasm:
	wasm-jobs/build.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# The benchmarks (bench/README.md), each printing its figures against a baseline measured in
# the same run, with what they need built first: the system packages (Mosquitto...), the
# venv, wasm3-run and umqtt, the firmware. A quiet machine gives the figures worth quoting.
BENCHES ?= edge ledger market slots files job_latency cluster
bench: deps venv edge-native firmware-unix
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

