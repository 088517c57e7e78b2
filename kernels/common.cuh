// common.cuh: the per-thread work of the block-ReLU kernels, as __host__ __device__ code so
// the very same functions run in the CUDA kernels (block_relu.cu, simulate.cu) and in the
// host-only harness (host_check.cu) that a Rust test compares with the CPU kernel.
//
// Semantics: docs/method.md section 2. Layout of ChannelOpt / SimEntry: src/ops/table.rs.
//
// Work split: one thread block per (n, c) plane. The plane is walked in tiles of k strips,
// a strip being bh rows (the last one may be partial). For each tile:
//   phase 1  one thread per (strip, column): column sum over the strip's rows, top to bottom
//            (coalesced global reads; these pixels are now in L1/L2);
//   phase 2  one thread per (strip, patch): patch sum = column sums left to right -> 0/1 flag;
//   phase 3  one thread per pixel: y = x * flag (x re-read from cache, y written once).
// That is the CPU kernel's sum order (src/ops/cpu.rs), so results are bit-identical to it.
// Phases are separated by a block barrier; the code is written against an executor `Ex`
// that either is one CUDA thread (barrier = __syncthreads) or, on the host, runs a phase for
// every thread index before the next phase starts (which is exactly what a barrier means).
#pragma once
#include <stdint.h>

#ifdef __CUDACC__
#define BR_HD __host__ __device__ __forceinline__
#else
#define BR_HD inline
#endif

struct ChannelOpt {
    uint32_t kind, bh, bw, pad;
};
struct SimEntry {
    uint32_t channel, kind, bh, bw;
};
static_assert(sizeof(ChannelOpt) == 16, "ChannelOpt must match src/ops/table.rs");
static_assert(sizeof(SimEntry) == 16, "SimEntry must match src/ops/table.rs");

enum : uint32_t { BR_KIND_PATCH = 0, BR_KIND_IDENTITY = 1, BR_KIND_ZERO = 2 };

// Threads per block; src/ops/cuda.rs launches with the same number (BLOCK_THREADS).
constexpr int BR_THREADS = 256;
// Shared floats for the column sums of one tile (and as many patch flags). Also the largest
// W the kernels accept (the host side checks it).
constexpr int BR_TILE_COLS = 2048;

// Floats of column-sum (and of flag) scratch a plane needs: a tile never has more column
// sums than BR_TILE_COLS nor than the plane has pixels.
BR_HD int br_scratch_floats(int h, int w) {
    int64_t n = (int64_t)h * w;
    return n < BR_TILE_COLS ? (int)n : BR_TILE_COLS;
}

// The tie rule: a patch is kept iff its sum is > 0 (an exact 0 gives 0).
BR_HD float br_keep(float sum) { return sum > 0.f ? 1.f : 0.f; }

// Number of patches of size b along an extent (ceil tiling). 64-bit so b up to 2^31-1 is fine.
BR_HD int br_count(int extent, int b) { return (int)(((int64_t)extent + b - 1) / b); }

// One past the last in-bounds index of patch p (edge clipping).
BR_HD int br_end(int p, int b, int extent) {
    int64_t e = ((int64_t)p + 1) * b;
    return e < extent ? (int)e : extent;
}

// The option of plane `plane` (planes are n*C + c) in a site table.
BR_HD ChannelOpt br_lookup(const ChannelOpt* table, int64_t plane, int channels) {
    return table[plane % channels];
}

// The option of channel c in simulation copy j: the perturbation's option on its channel,
// plain ReLU elsewhere.
BR_HD ChannelOpt br_sim_opt(const SimEntry* entries, int j, int c) {
    SimEntry e = entries[j];
    if ((int)e.channel == c) return ChannelOpt{e.kind, e.bh, e.bw, 0};
    return ChannelOpt{BR_KIND_PATCH, 1, 1, 0};
}

// How one plane is cut into tiles; every thread of a block computes the same value.
struct PlaneTiling {
    int h, w;
    int bh, bw;     // patch size clipped to the plane (a 9x9 patch on 4x4 is one 4x4 patch)
    int strips;     // ceil(h / bh)
    int pw;         // patches per strip: ceil(w / bw)
    int k;          // strips per tile, so k * w <= BR_TILE_COLS
    int tiles;      // ceil(strips / k)
};

BR_HD PlaneTiling br_tiling(int h, int w, ChannelOpt o) {
    PlaneTiling t;
    t.h = h;
    t.w = w;
    t.bh = (int64_t)o.bh < h ? (int)o.bh : h;
    t.bw = (int64_t)o.bw < w ? (int)o.bw : w;
    if (t.bh < 1) t.bh = 1;
    if (t.bw < 1) t.bw = 1;
    t.strips = br_count(h, t.bh);
    t.pw = br_count(w, t.bw);
    int k = w > 0 ? BR_TILE_COLS / w : 1;
    if (k < 1) k = 1;
    if (k > t.strips) k = t.strips;
    t.k = k;
    t.tiles = k > 0 ? br_count(t.strips, k) : 0;
    return t;
}

// Phase 1, thread `i` of tile `tile`: one column sum over one strip. False when i is idle.
BR_HD bool br_colsum(const float* x, const PlaneTiling& t, int tile, int i, float* colsum) {
    int s0 = tile * t.k;
    int ks = t.strips - s0 < t.k ? t.strips - s0 : t.k;
    if (i >= ks * t.w) return false;
    int s = i / t.w, j = i % t.w;
    int r0 = (s0 + s) * t.bh, r1 = br_end(s0 + s, t.bh, t.h);
    float acc = x[(int64_t)r0 * t.w + j];
    for (int r = r0 + 1; r < r1; ++r) acc += x[(int64_t)r * t.w + j];
    colsum[i] = acc;
    return true;
}

// Phase 2, thread `i`: one patch sum from the column sums -> flag (0.0 or 1.0).
BR_HD bool br_patch(const PlaneTiling& t, int tile, int i, const float* colsum, float* flag) {
    int s0 = tile * t.k;
    int ks = t.strips - s0 < t.k ? t.strips - s0 : t.k;
    if (i >= ks * t.pw) return false;
    int s = i / t.pw, p = i % t.pw;
    int c0 = p * t.bw, c1 = br_end(p, t.bw, t.w);
    const float* cs = colsum + s * t.w;
    float acc = cs[c0];
    for (int c = c0 + 1; c < c1; ++c) acc += cs[c];
    flag[i] = br_keep(acc);
    return true;
}

// Phase 3, thread `i`: the flag of one pixel of the tile and its offset in the plane.
// Returns the mask value, or a negative number when i is idle.
BR_HD float br_pixel(const PlaneTiling& t, int tile, int i, const float* flag, int64_t* at) {
    int r0 = tile * t.k * t.bh;
    int r1 = br_end(tile, t.k * t.bh, t.h);
    if (i >= (r1 - r0) * t.w) return -1.f;
    int r = i / t.w, j = i % t.w;
    *at = (int64_t)(r0 + r) * t.w + j;
    return flag[(r / t.bh) * t.pw + j / t.bw];
}

// Writes one output pixel: y = x * m (x * 0 keeps the reference's -0.0 and NaN), and the mask.
template <class M>
BR_HD void br_store(const float* x, float* y, M* mask, int64_t at, float m) {
    if (y) y[at] = x[at] * m;
    if (mask) mask[at] = (M)m;
}

// One whole plane: `x`, `y`, `mask` point at the plane; `y` or `mask` may be null.
// `ex.threads()` is the block size, `ex.run(f)` runs f(thread index) for this thread (device)
// or for every thread (host), `ex.sync()` is the barrier between phases.
// The executor is host-only in the harness and device-only in kernels; the template is
// only ever instantiated on the matching side, so the execution-space check is disabled.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <class Ex, class M>
BR_HD void br_plane(Ex& ex, const float* x, float* y, M* mask, int h, int w, ChannelOpt o,
                    float* colsum, float* flag) {
    const int64_t n = (int64_t)h * w;
    const int nt = ex.threads();
    if (o.kind != BR_KIND_PATCH || (o.bh == 1 && o.bw == 1)) {
        // Identity, zero and plain ReLU need no patch sums: one elementwise pass.
        const int kind = (int)o.kind;
        ex.run([&](int tid) {
            for (int64_t at = tid; at < n; at += nt) {
                float m = kind == BR_KIND_IDENTITY ? 1.f : kind == BR_KIND_ZERO ? 0.f : br_keep(x[at]);
                br_store(x, y, mask, at, m);
            }
        });
        return;
    }
    const PlaneTiling t = br_tiling(h, w, o);
    for (int tile = 0; tile < t.tiles; ++tile) {
        ex.run([&](int tid) {
            for (int i = tid; br_colsum(x, t, tile, i, colsum); i += nt) {}
        });
        ex.sync();
        ex.run([&](int tid) {
            for (int i = tid; br_patch(t, tile, i, colsum, flag); i += nt) {}
        });
        ex.sync();
        ex.run([&](int tid) {
            int64_t at = 0;
            float m;
            for (int i = tid; (m = br_pixel(t, tile, i, flag, &at)) >= 0.f; i += nt) br_store(x, y, mask, at, m);
        });
        // The next tile overwrites colsum/flag, which phase 3 of this tile still reads.
        ex.sync();
    }
}

// grad_x = grad_y * mask, mask u8 (0 or not), for element `at`.
BR_HD float br_backward(float grad_y, uint8_t mask) { return grad_y * (mask != 0 ? 1.f : 0.f); }
