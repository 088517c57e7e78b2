# The two commands a newcomer runs: `make demo` and `make test`. Both set up what is missing.
CARGO ?= cargo

.PHONY: setup test test-portable test-kernels test-all demo lint fmt bench cuda-setup cuda-build gpu gpu-check gpu-check-cpu clean

## libtorch and the gloo headers (scripts/setup.sh does nothing when both are in place).
setup:
	scripts/setup.sh

## Run the test suite (CPU; GPU tests skip themselves when no GPU is present).
test: setup
	$(CARGO) test

## The suite once more on libtorch's most portable kernels (oneDNN SSE4.1, ATen's default
## loops): float tolerances must hold whatever kernels the processor gets. CI runs this too.
test-portable: setup
	ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default $(CARGO) test

## The suite under every kernel choice libtorch 2.11 honours on x86-64 (same build, ~2.5 min each).
KERNEL_SETTINGS := ONEDNN_MAX_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX512_CORE ONEDNN_MAX_CPU_ISA=SSE41 \
	ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2
test-kernels: setup
	set -e; for s in $(KERNEL_SETTINGS); do echo "== $$s"; env $$s $(CARGO) test; done

## Slow tests too (training to a target accuracy, big models).
test-all: setup
	$(CARGO) test -- --include-ignored

## The main job on the built-in example.
demo: setup
	$(CARGO) build --release
	scripts/demo.sh

## Formatting, size limits (scripts/size-check.py), clippy without and with the CUDA kernels.
lint: cuda-setup
	$(CARGO) fmt --check
	python3 scripts/size-check.py
	$(CARGO) clippy --all-targets -- -D warnings
	NVCC=$$(scripts/nvcc-path.sh) $(CARGO) clippy --all-targets --features cuda -- -D warnings

fmt:
	$(CARGO) fmt

bench: setup
	$(CARGO) bench

cuda-setup: setup
	scripts/setup.sh nvcc

## Build with the CUDA kernels (nvcc from PyPI, see cuda-setup).
cuda-build: cuda-setup
	NVCC=$$(scripts/nvcc-path.sh) $(CARGO) build --features cuda --all-targets

## Build and pack the GPU check into .gpu/ (under 48 MiB, executables xz-compressed); on the GPU machine run
## .gpu/gpu-check.sh; `make gpu-check-cpu` runs the same steps on the CPU (CI does both).
gpu-check: gpu

## The GPU check's steps on the CPU, from a CPU build packed the same way (CI runs this).
gpu-check-cpu: setup
	scripts/gpu.sh build-cpu
	.gpu-cpu/gpu-check.sh --cpu --out target/gpu-check-cpu

## Build CUDA binaries here, run tests and benches on a lent GPU machine (see scripts/gpu.sh).
gpu: cuda-setup
	scripts/gpu.sh build

clean:
	$(CARGO) clean
