// simulate.cu: batched perturbation copies for distortion extraction. Output [J*N, C, H, W],
// copy-major: plane q = (j*N + n)*C + c is ReLU(x[n, c]) unless c is copy j's perturbed
// channel, which uses that perturbation's option. One block per output plane; x (N*C planes)
// is read J times but stays in L2 for the site sizes distortion extraction uses, so DRAM sees
// about one read of x and one write of the output.
#include "device_block.cuh"

extern "C" __global__ void __launch_bounds__(BR_THREADS)
block_relu_simulate_f32(const float* __restrict__ x, float* __restrict__ out, const SimEntry* __restrict__ entries,
                        int n, int channels, int h, int w) {
    BR_SHARED_SCRATCH(h, w)
    DeviceBlock ex;
    const int64_t q = blockIdx.x;
    const int64_t per_copy = (int64_t)n * channels;
    const int j = (int)(q / per_copy);
    const int64_t src = q % per_copy;
    const int c = (int)(src % channels);
    const int64_t hw = (int64_t)h * w;
    br_plane(ex, x + src * hw, out + q * hw, (uint8_t*)nullptr, h, w, br_sim_opt(entries, j, c), br_colsum_s,
             br_flag_s);
}
