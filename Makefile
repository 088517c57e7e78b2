# The two commands a newcomer runs: `make demo` and `make test`. Both set up what is missing.
CARGO ?= cargo
SETUP_STAMP := .libtorch/.stamp-torch-2.11.0

.PHONY: setup test test-all demo lint fmt bench cuda-setup cuda-build gpu clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP):
	scripts/setup.sh

## Run the test suite (CPU; GPU tests skip themselves when no GPU is present).
test: setup
	$(CARGO) test

## Slow tests too (training to a target accuracy, big models).
test-all: setup
	$(CARGO) test -- --include-ignored

## The main job on the built-in example.
demo: setup
	$(CARGO) build --release
	scripts/demo.sh

lint: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: setup
	$(CARGO) bench

cuda-setup: setup
	scripts/setup.sh nvcc

## Build with the CUDA kernels (nvcc from PyPI, see cuda-setup).
cuda-build: cuda-setup
	NVCC=$$(scripts/nvcc-path.sh) $(CARGO) build --features cuda --all-targets

## Build CUDA binaries here, run tests and benches on a lent GPU machine (see scripts/gpu.sh).
gpu: cuda-setup
	scripts/gpu.sh build

clean:
	$(CARGO) clean
