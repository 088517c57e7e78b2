// device_block.cuh: the executor that runs common.cuh's phase code as one CUDA thread of a
// block (the host harness has its own executor that loops over all thread indices).
#pragma once
#include "common.cuh"

struct DeviceBlock {
    __device__ int threads() const { return blockDim.x; }
    template <class F>
    __device__ void run(F f) { f((int)threadIdx.x); }
    __device__ void sync() { __syncthreads(); }
};

// Shared scratch of one block: the tile's column sums and patch flags, sized at launch
// (2 * br_scratch_floats(h, w) floats) so that blocks over small planes stay small and many
// fit on one SM.
#define BR_SHARED_SCRATCH(h, w)                  \
    extern __shared__ float br_dyn_s[];         \
    float* br_colsum_s = br_dyn_s;              \
    float* br_flag_s = br_dyn_s + br_scratch_floats(h, w);
