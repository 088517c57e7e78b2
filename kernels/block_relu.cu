// block_relu.cu: block-ReLU forward, forward+mask, mask-only and backward kernels over a
// per-channel option table in device memory, so ONE launch covers a whole site with mixed
// patch sizes, identity and zero channels. Grid: one block of BR_THREADS per (n, c) plane
// (planes = N*C); the per-thread work is in common.cuh. Each pixel of x is read from DRAM
// once (phase 1), re-read from cache (phase 3), and y is written once.
#include "device_block.cuh"

// y = block_relu(x) (inference).
extern "C" __global__ void __launch_bounds__(BR_THREADS)
block_relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y, const ChannelOpt* __restrict__ table,
                   int channels, int h, int w) {
    BR_SHARED_SCRATCH(h, w)
    DeviceBlock ex;
    const int64_t plane = blockIdx.x;
    const int64_t off = plane * h * w;
    br_plane(ex, x + off, y + off, (uint8_t*)nullptr, h, w, br_lookup(table, plane, channels), br_colsum_s,
             br_flag_s);
}

// y and the u8 mask in one pass (training with an explicit backward).
extern "C" __global__ void __launch_bounds__(BR_THREADS)
block_relu_fwd_mask_f32(const float* __restrict__ x, float* __restrict__ y, uint8_t* __restrict__ mask,
                        const ChannelOpt* __restrict__ table, int channels, int h, int w) {
    BR_SHARED_SCRATCH(h, w)
    DeviceBlock ex;
    const int64_t plane = blockIdx.x;
    const int64_t off = plane * h * w;
    br_plane(ex, x + off, y + off, mask + off, h, w, br_lookup(table, plane, channels), br_colsum_s, br_flag_s);
}

// The f32 0/1 mask alone (the tch autograd path multiplies x by it).
extern "C" __global__ void __launch_bounds__(BR_THREADS)
block_relu_mask_f32(const float* __restrict__ x, float* __restrict__ mask, const ChannelOpt* __restrict__ table,
                    int channels, int h, int w) {
    BR_SHARED_SCRATCH(h, w)
    DeviceBlock ex;
    const int64_t plane = blockIdx.x;
    const int64_t off = plane * h * w;
    br_plane(ex, x + off, (float*)nullptr, mask + off, h, w, br_lookup(table, plane, channels), br_colsum_s,
             br_flag_s);
}

// grad_x = grad_y * mask over n elements (grid-stride loop).
extern "C" __global__ void __launch_bounds__(BR_THREADS)
block_relu_bwd_f32(const float* __restrict__ grad_y, const uint8_t* __restrict__ mask, float* __restrict__ grad_x,
                   int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        grad_x[i] = br_backward(grad_y[i], mask[i]);
}
