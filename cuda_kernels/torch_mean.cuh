// torch.mean of a contiguous float32 CUDA tensor, bit for bit. bitsandbytes stores `absmax.mean()`, as
// torch's reduce_kernel computes it, as the double-quantization offset; its float32 sum follows a fixed
// order that depends on the length and the GPU (Reduce.cuh, torch 2.11 to 2.13). CPU twin and the full
// account of that order: bnbcli/formats/cuda_mean.py, whose reduce_config() also gives the launch
// geometry the host passes here: `width` lanes per torch CTA (a power of two <= 512), `ctas` CTAs,
// float4 loads when `vectorized`.
//
// Two stages instead of torch's one kernel with a semaphore (which costs a memset and ~7 us for a
// million floats on an H100): first each torch CTA's sum (a "partial"), then the consumer of the mean
// (kQuantizeBlockwise) folds those partial sums itself, as torch's last CTA would. The partials come
// either from kTorchMeanPartials (any float tensor) or, for double quantization, from MeanSink inside
// the first-level kQuantizeBlockwise, over the absmax it writes: no launch of its own.
#pragma once
#include "bnb_common.cuh"

#define TORCH_MEAN_MAX_WIDTH 512  // lanes of a torch CTA; our CTAs hold two lanes per thread

// How the sums read x: through the non-coherent path when an earlier kernel wrote it, at L2 when
// other CTAs of the running kernel did (MeanSink). DEPTH: vectors of each lane loaded at once (8
// registers each): MeanSink shares the registers of kQuantizeBlockwise, whose limit is 64.
struct EarlierKernel {
    enum { DEPTH = 4 };
    __device__ static U32x4 v4(const float* p) { return ld_v4(p); }
    __device__ static float f32(const float* p) { return *p; }
};
struct ThisKernel {
    enum { DEPTH = 2 };
    __device__ static U32x4 v4(const float* p) { return ld_cg_v4(p); }
    __device__ static float f32(const float* p) { return ld_cg_f32(p); }
};

// One torch thread's sum (its thread_reduce): thread g of T reads float4 vector g, g + T, ... with
// lane i of each vector in accumulator i, the n % 4 tail element g added to accumulator 0 when
// g < n % 4; without vectorization the k-th element of thread g (x[g + k T]) goes to accumulator
// k % 4. Accumulators start at +0.0f and are folded 0 + 1, + 2, + 3.
struct TorchLaneSum {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    __device__ void add(U32x4 q) {
        acc[0] = add_rn(acc[0], u2f(q.x));
        acc[1] = add_rn(acc[1], u2f(q.y));
        acc[2] = add_rn(acc[2], u2f(q.z));
        acc[3] = add_rn(acc[3], u2f(q.w));
    }
    __device__ float fold() const { return add_rn(add_rn(add_rn(acc[0], acc[1]), acc[2]), acc[3]); }
};

// The sums of torch threads g0 and g0 + 256 (when `both`), vectorized: their vectors are loaded
// Loads::DEPTH at a time, both lanes together (the sums are serial, the loads need not be), and added
// in torch's order.
template <class Loads>
__device__ __forceinline__ void torch_vector_sums(const float* x, u32 n, u32 g0, bool both, u32 T, float& lo,
                                                  float& hi) {
    const u32 vectors = n >> 2;
    TorchLaneSum a, b;
    for (u32 first = g0; first < vectors; first += Loads::DEPTH * T) {
        U32x4 qa[Loads::DEPTH], qb[Loads::DEPTH];
#pragma unroll
        for (int j = 0; j < Loads::DEPTH; j++) {
            const u32 v = first + j * T;
            if (v < vectors) qa[j] = Loads::v4(x + 4 * v);
            if (both && v + BNB_THREADS < vectors) qb[j] = Loads::v4(x + 4 * (v + BNB_THREADS));
        }
#pragma unroll
        for (int j = 0; j < Loads::DEPTH; j++) {
            const u32 v = first + j * T;
            if (v < vectors) a.add(qa[j]);
            if (both && v + BNB_THREADS < vectors) b.add(qb[j]);
        }
    }
    const u32 tail = n - 4 * vectors;
    if (g0 < tail) a.acc[0] = add_rn(a.acc[0], Loads::f32(x + 4 * vectors + g0));  // tail < 4 <= g0 + 256
    lo = a.fold();
    hi = both ? b.fold() : 0.0f;
}

// Without vectorization (n < 128: one CTA of at most 64 lanes, so one lane per thread).
template <class Loads>
__device__ __forceinline__ float torch_strided_sum(const float* x, u32 n, u32 g, u32 T) {
    TorchLaneSum a;
    for (u32 i = g; i < n; i += 4 * T) {
#pragma unroll
        for (int k = 0; k < 4; k++)  // constant indices keep the accumulators in registers
            if (i + k * T < n) a.acc[k] = add_rn(a.acc[k], Loads::f32(x + i + k * T));
    }
    return a.fold();
}

// block_x_reduce over `width` lanes: lane[x] += lane[x + w] for w = width/2 ... 1, lane 0's result
// returned to every thread. Thread t holds lane t (`lo`) and lane t + 256 (`hi`, used when width is
// 512). Every thread of the CTA must call it; `s` is 256 floats of shared memory.
__device__ __forceinline__ float torch_block_reduce(float lo, float hi, int width, float* s) {
    const int t = threadIdx.x;
    s[t] = width == TORCH_MEAN_MAX_WIDTH ? add_rn(lo, hi) : lo;
    __syncthreads();
    for (int w = (width == TORCH_MEAN_MAX_WIDTH ? BNB_THREADS : width) >> 1; w >= 1; w >>= 1) {
        if (t < w) s[t] = add_rn(s[t], s[t + w]);  // reads lanes [w, 2w), writes [0, w): no overlap
        __syncthreads();
    }
    const float total = s[0];
    __syncthreads();  // s may be reused by the caller
    return total;
}

// The mean from the per-CTA sums: with several CTAs torch's last CTA has lane x add partials x,
// x + width, ... onto +0.0f, then block_x_reduce; one CTA's sum is the total. Then MeanOps::project:
// total * factor, factor = 1.0f / float(n) (an IEEE multiply, subnormals kept).
__device__ __forceinline__ float torch_mean_total(const float* partials, int ctas, int width, float factor,
                                                  float* s) {
    float total;
    if (ctas == 1) {
        total = partials[0];
    } else {
        const int t = threadIdx.x;
        float lo = 0.0f, hi = 0.0f;
        if (t < width)
            for (int i = t; i < ctas; i += width) lo = add_rn(lo, partials[i]);
        if (t + BNB_THREADS < width)
            for (int i = t + BNB_THREADS; i < ctas; i += width) hi = add_rn(hi, partials[i]);
        total = torch_block_reduce(lo, hi, width, s);
    }
    return mul_rn(total, factor);
}

// Torch CTA `cta`'s sum of x (of `ctas` torch CTAs; n < 2^31, so u32 indices), returned to every thread of the calling CTA, which
// must all call it; `s` is 256 floats of shared memory.
template <class Loads>
__device__ __forceinline__ float torch_cta_sum(const float* x, u32 n, int width, int ctas, int vectorized, int cta,
                                               float* s) {
    const u32 T = u32(width) * u32(ctas);
    const u32 first = u32(cta) * u32(width);
    const int t = threadIdx.x;
    float lo = 0.0f, hi = 0.0f;
    if (vectorized && t < width) {
        torch_vector_sums<Loads>(x, n, first + t, t + BNB_THREADS < width, T, lo, hi);
    } else if (t < width) {
        lo = torch_strided_sum<Loads>(x, n, first + t, T);
    }
    return torch_block_reduce(lo, hi, width, s);
}

// Stage one on its own: CTA c computes torch CTA c's sum into partials[c]. Grid: `ctas` CTAs of 256 threads.
__global__ void __launch_bounds__(BNB_THREADS)
    kTorchMeanPartials(const float* __restrict__ x, i64 n, int width, int vectorized, float* __restrict__ partials) {
    __shared__ float s[BNB_THREADS];
    const float total = torch_cta_sum<EarlierKernel>(x, u32(n), width, gridDim.x, vectorized, blockIdx.x, s);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// Stage one fused into the kernel that writes x (the first level of double quantization writing its
// absmax). Torch's thread g reads float4 vectors g, g + T, g + 2T, ... (T = width * ctas), so torch CTA
// ("unit") u owns the chunks of 4 * width floats whose index is u modulo ctas, plus, for u = 0, the
// n % 4 tail floats past the last vector. When a CTA of the writing kernel has stored its last float
// of x, it adds what it stored of each unit to that unit's count, and the CTA whose addition completes
// a unit computes the unit's sum into partials[unit], reading at L2 what the others wrote. `counts`
// holds `ctas` zeros before the launch; each unit's completer resets its count, so the buffer is zero
// again for the next launch on the same stream.
struct MeanSink {
    const float* x;
    float* partials;
    u32* counts;
    u32 n;  // < 2^31 (the host checks), so u32 arithmetic throughout
    int ctas, width, vectorized;

    __device__ u32 vector_end() const { return vectorized && ctas > 1 ? n & ~3u : 0u; }  // one CTA: one unit
    __device__ int chunk_shift() const { return 33 - __clz(width); }                 // 4 * width floats
    __device__ u32 expected(int u) const {
        const int shift = chunk_shift();
        const u32 full = vector_end() >> shift, rest = vector_end() - (full << shift);
        u32 count = (full / u32(ctas) + (u32(u) < full % u32(ctas) ? 1u : 0u)) << shift;
        if (rest > 0 && full % u32(ctas) == u32(u)) count += rest;
        if (u == 0) count += n - vector_end();
        return count;
    }
    // Called by every thread of a CTA that has stored x[a0, a1) (or nothing: a0 == a1) and is done.
    __device__ void stored(u32 a0, u32 a1, float* s) const {
        __shared__ int completed[BNB_THREADS];
        const int shift = chunk_shift();
        const u32 vend = min(a1, vector_end());
        const u32 chunk0 = a0 >> shift;
        const u32 vector_runs = a0 < vend ? ((vend - 1) >> shift) - chunk0 + 1 : 0u;
        const u32 runs = vector_runs + (a1 > max(a0, vend) ? 1u : 0u);  // + the run past the vectors
        fence_gpu();  // this thread's stores of x, before the counts that publish them
        for (u32 base = 0; base < runs; base += BNB_THREADS) {
            __syncthreads();
            const u32 r = base + threadIdx.x;
            int done = -1;
            if (r < runs) {  // run r: one chunk's part of [a0, a1), or the floats past the vectors
                const bool vec = r < vector_runs;
                const u32 begin = vec ? max(a0, (chunk0 + r) << shift) : max(a0, vend);
                const u32 end = vec ? min(vend, (chunk0 + r + 1) << shift) : a1;
                const int u = vec ? int((chunk0 + r) % u32(ctas)) : 0;
                const u32 before = atomic_add_u32(counts + u, end - begin);
                if (before + (end - begin) == expected(u)) {
                    fence_gpu();  // the other CTAs' stores, before this CTA reads them
                    done = u;
                }
            }
            completed[threadIdx.x] = done;
            __syncthreads();
            for (u32 k = 0; k < min(runs - base, u32(BNB_THREADS)); k++) {
                const int u = completed[k];
                if (u < 0) continue;
                const float total = torch_cta_sum<ThisKernel>(x, n, width, ctas, vectorized, u, s);
                if (threadIdx.x == 0) {
                    partials[u] = total;
                    counts[u] = 0u;
                }
            }
        }
    }
};
