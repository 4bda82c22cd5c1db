# The two quick-start commands (see README):  make bench   |   make test
# Each sets up .venv (CPU torch 2.13.0 from the local wheel, then transfuse built in place).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
CSRC := $(shell find csrc -type f)
PY_SOURCES := $(shell find python kernels -name '*.py')

.PHONY: setup bench test test-cpp test-python test-lower-isa test-triton-compile test-gpu-quick-dry \
	test-gpu-versions clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) numpy  # numpy first: the build imports torch
	TRANSFUSE_REQUIRE_EXTENSION=1 $(BIN)/python -m pip install -q --no-build-isolation -e ".[test,bench]"
	touch $@

# writes bench-results/ (untracked); refresh the committed results on purpose with
# make bench BENCH_ARGS="--out benchmarks/results"
bench: setup
	$(BIN)/transfuse bench $(BENCH_ARGS)

test: test-cpp test-python test-lower-isa test-gpu-quick-dry

test-cpp:
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

# `pytest`, not `python -m pytest`: the latter puts the repository root on sys.path, where kernels/
# shadows Hugging Face's `kernels` package that transformers imports
test-python: setup
	$(BIN)/pytest

# The CPU kernels written with intrinsics dispatch on the CPU's best ISA; their AVX2 and baseline
# paths (and, under avx2, the int8 paths of a CPU without VNNI) run here too with TRANSFUSE_CPU_ISA
# (csrc/cpu/multiversion.h): the cpu int8, linear and norm tests. On a CPU with AMX, avx512 runs
# the AVX-512 GEMMs that AMX replaces there (csrc/cpu/amx.h).
test-lower-isa: setup
	for isa in $$($(BIN)/python -c "import torch, transfuse._C as c; print('avx512' * c.cpu_amx)") \
			avx2 baseline; do \
		TRANSFUSE_CPU_ISA=$$isa $(BIN)/pytest -q -p no:cacheprovider -k cpu \
			tests/test_int8.py tests/test_linear.py tests/test_norm.py || exit 1; \
	done

# The lent GPU's one command, dry (CPU, tiny shapes, Triton interpreter): seconds.
test-gpu-quick-dry: setup
	PATH=$(abspath $(BIN)):$$PATH bash benchmarks/gpu_quick.sh --dry-run

# The GPU machine's versions (torch 2.11, transformers 5.17, triton 3.6 with numpy < 2.4) in a
# second venv: what the GPU machine runs that the CPU leg cannot vouch for there -- the extension
# built against torch 2.11, one variant of every Triton kernel compiled by triton 3.6 for sm_80
# and sm_90, the int8, linear, varlen and bias_gelu ops on the cpu backend, and on transformers 5.17 the
# int8 / quantizer / checkpoint, HF attention, padding-removal, block-rule and family tests (the Triton
# interpreter tests run in the main leg), and the GPU command's models stage, dry.
GPU_VENV ?= .venv-gpu-versions
GPU_BIN := $(GPU_VENV)/bin
GPU_VERSIONS ?= torch==2.11.0 "transformers==5.17.*" "triton==3.6.*" "numpy<2.4"
GPU_TESTS ?= tests/test_triton_compile.py tests/test_int8.py tests/test_varlen_attention.py \
	tests/test_hf_int8.py tests/test_quantize.py tests/test_hf_attention.py tests/test_hf_unpad.py \
	tests/test_int8_checkpoint_fuzz.py tests/test_hf_blocks.py tests/test_hf_blocks_encoder_layer.py \
	tests/test_activation.py \
	tests/test_hf_families.py tests/test_linear.py tests/test_hf_encoder_model.py \
	tests/test_hf_blocks_relative_bias.py tests/test_hf_blocks_decoder_layer.py \
	tests/test_hf_more_families.py tests/test_hf_blocks_seq2seq_decoder_layer.py

$(GPU_VENV)/.installed: setup.py pyproject.toml $(CSRC) $(PY_SOURCES)
	test -x $(GPU_BIN)/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_BIN)/python -m pip install -q --upgrade pip
	$(GPU_BIN)/python -m pip install -q $(GPU_VERSIONS) pytest hypothesis safetensors \
		"accelerate>=1.1" ninja setuptools wheel
	# built from a copy, installed (not editable): the in-tree extension and build/ stay .venv's
	rm -rf $(GPU_VENV)/src && mkdir -p $(GPU_VENV)/src
	cp -r setup.py pyproject.toml README.md csrc kernels python $(GPU_VENV)/src/
	rm -f $(GPU_VENV)/src/python/transfuse/_C*.so $(GPU_VENV)/src/python/transfuse/_build_error.txt
	cd $(GPU_VENV)/src && TRANSFUSE_NO_CUDA=1 TRANSFUSE_REQUIRE_EXTENSION=1 \
		$(abspath $(GPU_BIN))/python -m pip install -q --no-build-isolation --no-deps .
	touch $@

test-gpu-versions: $(GPU_VENV)/.installed
	$(GPU_BIN)/python -c "import torch, transformers, triton, numpy; print('torch', \
		torch.__version__, 'transformers', transformers.__version__, 'triton', \
		triton.__version__, 'numpy', numpy.__version__)"
	$(GPU_BIN)/pytest -q -p no:cacheprovider -k "not triton-cpu" $(GPU_TESTS)
	# the lent GPU's models stage, dry, on its versions (transformers 5.17 builds and patches the
	# models); not the kernels stage: triton 3.6's interpreter rejects bool scalar arguments
	# (compiled, they are fine: tests/test_triton_compile.py above)
	GPU_QUICK_SKIP=kernels PYTHON=$(abspath $(GPU_BIN))/python bash benchmarks/gpu_quick.sh --dry-run

clean:
	rm -rf build $(VENV) $(GPU_VENV) python/transfuse/_C*.so python/transfuse/_build_error.txt
