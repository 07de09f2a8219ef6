//! ult's paged attention for CUDA: one launch attends every row of a step (decode rows and prefill chunks of
//! many sequences) over the block pool, and one launch writes the step's keys and values into it.
//!
//! Built at compile time by `engine/build.rs` with nvcc for the GPU's architecture (sm_90 by default) into a
//! cubin that the binary carries, so nothing here is JIT-compiled at run time. The host side is
//! `engine/src/cuda_kernels.rs`; the metadata it reads is built by `attention::PagedMeta`, portable code
//! that the CPU tests check against the host loops.
//!
//! Metadata (one u32 buffer per layer group and step):
//!   meta[2r], meta[2r+1]  row r's first key in `keys` and its key count (positions lo(p)..=p, in order);
//!   keys[j]               a key's source: a pool slot, or (bit 31 set) a row of this step's fresh k/v.
//! Fresh keys and values are rounded to the pool's f16 before use, so a key reads the same value whether it
//! comes from this step or from the pool: a row's result depends only on its query, its keys and its
//! position, not on how the sequence was chunked or batched (the order of the sums is fixed by key index).

#include <cuda_fp16.h>
#include <math.h>

#define WARPS 4
#define UNROLL 4
#define FRESH 0x80000000u

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half(x)); }

// Split-K (flash-decoding): a row's keys are cut into n = min(max_splits, ceil(count / split_keys)) runs of
// ceil(count / n) keys, one block each, so a long context spreads over many blocks even for one decode row.
// n depends only on the row's key count, never on the rest of the step, so results stay row-local.
__device__ __forceinline__ unsigned n_splits(unsigned count, unsigned split_keys, unsigned max_splits) {
    const unsigned n = (count + split_keys - 1) / split_keys;
    return n < 1 ? 1 : (n > max_splits ? max_splits : n);
}

// One block per (row, query head, split); each warp takes keys j ≡ its index (mod WARPS·UNROLL) of its run
// in runs of UNROLL, lanes split the head's dimensions (E = HD / 32 each), online softmax per warp, warps
// merged at the end. A row of one split writes its output; a row of several writes (max, sum, unnormalised
// accumulator) per split to `part`, which `combine` merges in split order.
template <int HD>
__device__ void attend(const float* __restrict__ q, const float* __restrict__ k_new,
                       const float* __restrict__ v_new, const __half* __restrict__ pool_k,
                       const __half* __restrict__ pool_v, const unsigned* __restrict__ meta,
                       const unsigned* __restrict__ keys, float* __restrict__ out,
                       float* __restrict__ part, int nh, int nkv, float scale, unsigned split_keys,
                       unsigned max_splits, unsigned splits) {
    constexpr int E = HD / 32;
    const int row = blockIdx.x, h = blockIdx.y;
    const unsigned split = blockIdx.z;
    const unsigned kstart = meta[2 * row], kcount = meta[2 * row + 1];
    const unsigned n = n_splits(kcount, split_keys, max_splits);
    if (split >= n) return;
    const unsigned run = (kcount + n - 1) / n;
    const unsigned begin = split * run;
    const unsigned end = min(kcount, begin + run);
    const int g = h / (nh / nkv);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    float qv[E];
    const float* qr = q + ((size_t)row * nh + h) * HD + lane * E;
#pragma unroll
    for (int e = 0; e < E; e++) qv[e] = qr[e] * scale;

    float m = -INFINITY, l = 0.f, acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) acc[e] = 0.f;

    for (unsigned j0 = begin + warp * UNROLL; j0 < end; j0 += WARPS * UNROLL) {
        float s[UNROLL];
        size_t at[UNROLL];
        bool fresh[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const unsigned j = j0 + u;
            float dot = 0.f;
            fresh[u] = false;
            at[u] = 0;
            if (j < end) {
                const unsigned src = keys[kstart + j];
                fresh[u] = (src & FRESH) != 0;
                at[u] = ((size_t)(src & ~FRESH) * nkv + g) * HD + lane * E;
                if (fresh[u]) {
#pragma unroll
                    for (int e = 0; e < E; e++) dot += qv[e] * round_f16(k_new[at[u] + e]);
                } else {
#pragma unroll
                    for (int e = 0; e < E; e++) dot += qv[e] * __half2float(pool_k[at[u] + e]);
                }
            }
            s[u] = dot;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) s[u] = (j0 + u < end) ? warp_sum(s[u]) : -INFINITY;
        float m_new = m;
#pragma unroll
        for (int u = 0; u < UNROLL; u++) m_new = fmaxf(m_new, s[u]);
        const float corr = __expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int e = 0; e < E; e++) acc[e] *= corr;
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            if (j0 + u >= end) continue;
            const float p = __expf(s[u] - m_new);
            l += p;
            if (fresh[u]) {
#pragma unroll
                for (int e = 0; e < E; e++) acc[e] += p * round_f16(v_new[at[u] + e]);
            } else {
#pragma unroll
                for (int e = 0; e < E; e++) acc[e] += p * __half2float(pool_v[at[u] + e]);
            }
        }
        m = m_new;
    }

    __shared__ float sm[WARPS], sl[WARPS];
    __shared__ float sacc[WARPS][HD];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; e++) sacc[warp][lane * E + e] = acc[e];
    __syncthreads();
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm[w]);
    float wsum = 0.f, wt[WARPS];
#pragma unroll
    for (int w = 0; w < WARPS; w++) {
        // A warp that saw no key has m = -inf and l = 0: its weight is 0.
        wt[w] = sl[w] > 0.f ? __expf(sm[w] - mx) : 0.f;
        wsum += wt[w] * sl[w];
    }
    const size_t rh = (size_t)row * nh + h;
    if (n == 1) {
        float* o = out + rh * HD;
        for (int d = threadIdx.x; d < HD; d += blockDim.x) {
            float x = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) x += wt[w] * sacc[w][d];
            o[d] = x / wsum;
        }
        return;
    }
    // part: accumulators (rows · nh · splits · HD), then (max, sum) pairs (rows · nh · splits · 2).
    const size_t slot = rh * splits + split;
    float* pa = part + slot * HD;
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float x = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) x += wt[w] * sacc[w][d];
        pa[d] = x;
    }
    if (threadIdx.x == 0) {
        float* ml = part + (size_t)gridDim.x * nh * splits * HD + slot * 2;
        ml[0] = mx;
        ml[1] = wsum;
    }
}

// Merges the splits of every row that has several, in split order.
template <int HD>
__device__ void combine(const unsigned* __restrict__ meta, const float* __restrict__ part,
                        float* __restrict__ out, int nh, unsigned split_keys, unsigned max_splits,
                        unsigned splits) {
    const int row = blockIdx.x, h = blockIdx.y;
    const unsigned n = n_splits(meta[2 * row + 1], split_keys, max_splits);
    if (n == 1) return;
    const size_t rh = (size_t)row * nh + h;
    const float* ml = part + (size_t)gridDim.x * nh * splits * HD + rh * splits * 2;
    float mx = -INFINITY;
    for (unsigned s = 0; s < n; s++) mx = fmaxf(mx, ml[2 * s]);
    float wsum = 0.f;
    for (unsigned s = 0; s < n; s++) wsum += __expf(ml[2 * s] - mx) * ml[2 * s + 1];
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float x = 0.f;
        for (unsigned s = 0; s < n; s++) x += __expf(ml[2 * s] - mx) * part[(rh * splits + s) * HD + d];
        out[rh * HD + d] = x / wsum;
    }
}

#define ATTEND(HD)                                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) paged_attention_hd##HD(                    \
        const float* q, const float* k_new, const float* v_new, const __half* pool_k,                  \
        const __half* pool_v, const unsigned* meta, const unsigned* keys, float* out, float* part,     \
        int nh, int nkv, float scale, unsigned split_keys, unsigned max_splits, unsigned splits) {     \
        attend<HD>(q, k_new, v_new, pool_k, pool_v, meta, keys, out, part, nh, nkv, scale, split_keys, \
                   max_splits, splits);                                                                 \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) paged_combine_hd##HD(                      \
        const unsigned* meta, const float* part, float* out, int nh, unsigned split_keys,              \
        unsigned max_splits, unsigned splits) {                                                         \
        combine<HD>(meta, part, out, nh, split_keys, max_splits, splits);                              \
    }

ATTEND(32)
ATTEND(64)
ATTEND(128)
ATTEND(256)

// Writes each row's keys and values (`width` = kv heads · head dim f32 each) into its pool slot as f16;
// a slot of 0xffffffff (a ring position already passed) is skipped.
extern "C" __global__ void paged_write(const float* __restrict__ k_new, const float* __restrict__ v_new,
                                       const unsigned* __restrict__ slots, __half* __restrict__ pool_k,
                                       __half* __restrict__ pool_v, unsigned rows, unsigned width) {
    const size_t n = (size_t)rows * width;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / width, c = i % width;
        const unsigned slot = slots[r];
        if (slot == 0xffffffffu) continue;
        pool_k[(size_t)slot * width + c] = __float2half(k_new[i]);
        pool_v[(size_t)slot * width + c] = __float2half(v_new[i]);
    }
}
