// torch.mean of a contiguous float32 CUDA tensor, bit for bit. bitsandbytes stores `absmax.mean()`, as
// torch's reduce_kernel computes it, as the double-quantization offset; its float32 sum follows a fixed
// order that depends on the length and the GPU (Reduce.cuh, torch 2.11 to 2.13). CPU twin and the full
// account of that order: bnbcli/formats/cuda_mean.py, whose reduce_config() also gives the launch
// geometry the host passes here: `width` lanes per torch CTA (a power of two <= 512), `ctas` CTAs,
// float4 loads when `vectorized`.
//
// Two stages instead of torch's one kernel with a semaphore (which costs a memset and ~7 us for a
// million floats on an H100): kTorchMeanPartials computes each torch CTA's sum, and the consumer of
// the mean (kQuantizeBlockwise) folds those partial sums itself, as torch's last CTA would.
#pragma once
#include "bnb_common.cuh"

#define TORCH_MEAN_MAX_WIDTH 512  // lanes of a torch CTA; our CTAs hold two lanes per thread

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

#define TORCH_MEAN_DEPTH 4  // vectors of each lane in flight: the sums are serial, the loads need not be

// The sums of torch threads g0 and g0 + 256 (when `both`), vectorized: their vectors are loaded
// TORCH_MEAN_DEPTH at a time, both lanes together, and added in torch's order.
__device__ __forceinline__ void torch_vector_sums(const float* x, i64 n, i64 g0, bool both, i64 T, float& lo,
                                                  float& hi) {
    const i64 vectors = n >> 2;
    TorchLaneSum a, b;
    for (i64 first = g0; first < vectors; first += TORCH_MEAN_DEPTH * T) {
        U32x4 qa[TORCH_MEAN_DEPTH], qb[TORCH_MEAN_DEPTH];
#pragma unroll
        for (int j = 0; j < TORCH_MEAN_DEPTH; j++) {
            const i64 v = first + j * T;
            if (v < vectors) qa[j] = ld_v4(x + 4 * v);
            if (both && v + BNB_THREADS < vectors) qb[j] = ld_v4(x + 4 * (v + BNB_THREADS));
        }
#pragma unroll
        for (int j = 0; j < TORCH_MEAN_DEPTH; j++) {
            const i64 v = first + j * T;
            if (v < vectors) a.add(qa[j]);
            if (both && v + BNB_THREADS < vectors) b.add(qb[j]);
        }
    }
    const i64 tail = n - 4 * vectors;
    if (g0 < tail) a.acc[0] = add_rn(a.acc[0], x[4 * vectors + g0]);  // tail < 4 <= g0 + 256
    lo = a.fold();
    hi = both ? b.fold() : 0.0f;
}

// Without vectorization (n < 128: one CTA of at most 64 lanes, so one lane per thread).
__device__ __forceinline__ float torch_strided_sum(const float* x, i64 n, i64 g, i64 T) {
    TorchLaneSum a;
    for (i64 i = g; i < n; i += 4 * T) {
#pragma unroll
        for (int k = 0; k < 4; k++)  // constant indices keep the accumulators in registers
            if (i + k * T < n) a.acc[k] = add_rn(a.acc[k], x[i + k * T]);
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

// Stage one: CTA c computes torch CTA c's sum into partials[c]. Grid: `ctas` CTAs of 256 threads.
__global__ void __launch_bounds__(BNB_THREADS)
    kTorchMeanPartials(const float* __restrict__ x, i64 n, int width, int vectorized, float* __restrict__ partials) {
    __shared__ float s[BNB_THREADS];
    const i64 T = i64(width) * gridDim.x;
    const i64 first = i64(blockIdx.x) * width;
    const int t = threadIdx.x;
    float lo = 0.0f, hi = 0.0f;
    if (vectorized && t < width) {
        torch_vector_sums(x, n, first + t, t + BNB_THREADS < width, T, lo, hi);
    } else if (t < width) {
        lo = torch_strided_sum(x, n, first + t, T);
    }
    const float total = torch_block_reduce(lo, hi, width, s);
    if (t == 0) partials[blockIdx.x] = total;
}
