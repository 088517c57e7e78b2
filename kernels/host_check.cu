// host_check.cu: host-only harness for the per-thread code in common.cuh. It emulates the
// launch grids of block_relu.cu and simulate.cu on the CPU: for every block (plane) it runs
// each phase for every thread index 0..BR_THREADS-1 before starting the next phase (the
// meaning of __syncthreads), with the block's shared scratch poisoned with NaN first so a
// read of an unwritten entry shows up in the output. Built by build.rs with the same nvcc
// (feature `cuda`); tests/block_relu.rs feeds it random cases and compares with src/ops/cpu.rs.
//
// Usage: host_check IN OUT. IN (little endian): u32 magic 0x43485242 ("BRHC"), u32 mode,
// i32 N, C, H, W, J; then mode 0: C ChannelOpt, mode 1: J SimEntry; then f32 x[N*C*H*W].
// OUT: mode 0 (forward + mask): f32 y[N*C*H*W], u8 mask[N*C*H*W];
//      mode 1 (simulate):       f32 out[J*N*C*H*W].
#include "common.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

struct HostBlock {
    int nt;
    int threads() const { return nt; }
    template <class F>
    void run(F f) {
        for (int t = 0; t < nt; ++t) f(t);
    }
    void sync() {}
};

template <class T>
static bool read_n(FILE* f, T* dst, size_t n) {
    return fread(dst, sizeof(T), n, f) == n;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
        return 2;
    }
    FILE* in = fopen(argv[1], "rb");
    if (!in) {
        perror(argv[1]);
        return 2;
    }
    uint32_t head[2];
    int32_t dims[5];
    if (!read_n(in, head, 2) || head[0] != 0x43485242u || !read_n(in, dims, 5)) {
        fprintf(stderr, "host_check: bad header\n");
        return 2;
    }
    const uint32_t mode = head[1];
    const int n = dims[0], c = dims[1], h = dims[2], w = dims[3], jn = dims[4];
    if (n < 0 || c < 1 || h < 1 || w < 1 || w > BR_TILE_COLS || jn < 0 || mode > 1) {
        fprintf(stderr, "host_check: unsupported sizes\n");
        return 2;
    }
    const int64_t hw = (int64_t)h * w, numel = (int64_t)n * c * hw;
    std::vector<ChannelOpt> table(mode == 0 ? c : 0);
    std::vector<SimEntry> entries(mode == 1 ? jn : 0);
    std::vector<float> x(numel);
    if (!read_n(in, table.data(), table.size()) || !read_n(in, entries.data(), entries.size()) ||
        !read_n(in, x.data(), x.size())) {
        fprintf(stderr, "host_check: short input\n");
        return 2;
    }
    fclose(in);

    HostBlock ex{BR_THREADS};
    std::vector<float> colsum(BR_TILE_COLS), flag(BR_TILE_COLS);
    auto poison = [&] {
        std::fill(colsum.begin(), colsum.end(), NAN);
        std::fill(flag.begin(), flag.end(), NAN);
    };
    FILE* out = fopen(argv[2], "wb");
    if (!out) {
        perror(argv[2]);
        return 2;
    }
    if (mode == 0) {
        // The grid of block_relu_fwd_mask_f32: blockIdx.x = plane in 0..N*C.
        std::vector<float> y(numel, NAN);
        std::vector<uint8_t> mask(numel, 7);
        for (int64_t plane = 0; plane < (int64_t)n * c; ++plane) {
            poison();
            const int64_t off = plane * hw;
            br_plane(ex, x.data() + off, y.data() + off, mask.data() + off, h, w, br_lookup(table.data(), plane, c),
                     colsum.data(), flag.data());
        }
        fwrite(y.data(), sizeof(float), y.size(), out);
        fwrite(mask.data(), 1, mask.size(), out);
    } else {
        // The grid of block_relu_simulate_f32: blockIdx.x = output plane in 0..J*N*C.
        const int64_t per_copy = (int64_t)n * c;
        std::vector<float> y(per_copy * jn * hw, NAN);
        for (int64_t q = 0; q < per_copy * jn; ++q) {
            poison();
            const int j = (int)(q / per_copy);
            const int64_t src = q % per_copy;
            br_plane(ex, x.data() + src * hw, y.data() + q * hw, (uint8_t*)nullptr, h, w,
                     br_sim_opt(entries.data(), j, (int)(src % c)), colsum.data(), flag.data());
        }
        fwrite(y.data(), sizeof(float), y.size(), out);
    }
    if (fclose(out) != 0) {
        perror(argv[2]);
        return 2;
    }
    return 0;
}
