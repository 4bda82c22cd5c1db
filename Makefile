# The two quick-start commands (see README):  make bench   |   make test
# Each sets up .venv (CPU torch 2.13.0 from the local wheel, then transfuse built in place).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
CSRC := $(shell find csrc -type f)

.PHONY: setup bench test test-cpp test-python clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	TRANSFUSE_REQUIRE_EXTENSION=1 $(BIN)/python -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

bench: setup
	$(BIN)/transfuse bench

test: test-cpp test-python

test-cpp:
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

test-python: setup
	$(BIN)/python -m pytest

clean:
	rm -rf build $(VENV) python/transfuse/_C*.so python/transfuse/_build_error.txt
