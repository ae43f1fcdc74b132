// LLM.int8 row-wise quantization (CB int8, SCB float32 per row, optional outlier threshold) and its
// dequantization. Bytes of bitsandbytes' int8_vectorwise_quant (kInt8VectorQuant after the fp16 cast
// that Int8Params does) and int8_vectorwise_dequant; CPU twin: bnbcli/formats/int8.py
// reference_quantize_int8_rowwise / dequantize_int8_rowwise.
//
// Quantize launch: one 256-thread CTA per row. Rows whose length is a multiple of 8 (and whose
// start is 16-byte aligned) move in chunks of 8 elements with 16-byte loads and 8-byte stores; a row
// of up to 8192 elements stays in registers between the absmax pass and the quantize pass, and longer
// rows read their remainder twice (the second read mostly hits L2). Other rows go element by element.
#include "bnb_common.cuh"

#define ROW_CACHE_CHUNKS 4  // chunks of 8 elements each thread keeps: 256 * 8 * 4 = 8192 elements

// Every element becomes fp16 first (round to nearest even; |x| >= 65520 becomes inf), as
// Int8Params casts the weight to float16 before the kernel sees it.
template <class In>
struct AsHalf;
template <>
struct AsHalf<F16> {
    __device__ static u16 one(u16 h) { return h; }
    __device__ static void chunk(const u16* p, u32 h[4]) {
        const U32x4 r = ld_v4(p);
        h[0] = r.x, h[1] = r.y, h[2] = r.z, h[3] = r.w;
    }
};
template <>
struct AsHalf<BF16> {
    __device__ static u16 one(u16 b) { return f32_to_f16(bf16_to_f32(b)); }
    __device__ static void chunk(const u16* p, u32 h[4]) {
        const U32x4 r = ld_v4(p);
        const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = pack_f16x2(u2f(w[k] << 16), u2f(w[k] & 0xffff0000u));
    }
};
template <>
struct AsHalf<F32> {
    __device__ static u16 one(float f) { return f32_to_f16(f); }
    __device__ static void chunk(const float* p, u32 h[4]) {
        const U32x4 a = ld_v4(p), b = ld_v4(p + 4);
        h[0] = pack_f16x2(u2f(a.x), u2f(a.y));
        h[1] = pack_f16x2(u2f(a.z), u2f(a.w));
        h[2] = pack_f16x2(u2f(b.x), u2f(b.y));
        h[3] = pack_f16x2(u2f(b.z), u2f(b.w));
    }
};

// An element is an outlier when threshold > 0 and |x| >= threshold (float32 compare of the fp16 value).
// Outliers and NaNs stay out of the row absmax; outliers become 0 and mark their column.
__device__ __forceinline__ bool is_outlier(u32 magnitude, float threshold) {
    return threshold > 0.0f && f16_to_f32(u16(magnitude)) >= threshold;
}

// The row absmax is kept as fp16 magnitude bits (which order like the values): -1 means "nothing
// counted yet". NaN magnitudes (> 0x7c00) never count.
__device__ __forceinline__ int absmax_bits(int m, u32 h, i64 col, float threshold, u8* col_flags) {
    const u32 magnitude = h & 0x7fffu;
    if (magnitude > 0x7c00u) return m;
    if (is_outlier(magnitude, threshold)) {
        col_flags[col] = 1;  // several threads may store the same 1: no atomics needed
        return m;
    }
    return max(m, int(magnitude));
}

// One element of CB: round-half-even(x * scale) as __float2int_rn does; NaN (0*inf for an all-zero
// row, or a NaN input) and outliers give 0.
__device__ __forceinline__ i32 quantize_one(u32 h, float scale, float threshold) {
    const u32 magnitude = h & 0x7fffu;
    if (magnitude > 0x7c00u || is_outlier(magnitude, threshold)) return 0;
    const float scaled = mul_rn(f16_to_f32(u16(h)), scale);  // torch's IEEE multiply, no ftz
    if (is_nan(scaled)) return 0;
    return f2i_rn(scaled);
}

__device__ __forceinline__ int cta_max_int(int m, int* scratch) {
    m = __reduce_max_sync(BNB_FULL_MASK, m);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
    __syncthreads();
    m = scratch[0];
#pragma unroll
    for (int k = 1; k < BNB_THREADS / 32; k++) m = max(m, scratch[k]);
    return m;
}

template <class In>
__global__ void __launch_bounds__(BNB_THREADS)
    kInt8RowQuant(const typename In::storage* __restrict__ x, int cols, int vectorized, float threshold,
                  i8* __restrict__ cb, float* __restrict__ scb, u8* __restrict__ col_flags) {
    __shared__ int scratch[BNB_THREADS / 32];
    const i64 row0 = i64(blockIdx.x) * cols;
    const typename In::storage* xr = x + row0;
    i8* out = cb + row0;
    const int chunks = vectorized ? cols / 8 : 0;

    // Pass 1: the row absmax over counted elements.
    int m = -1;
    u32 cache[ROW_CACHE_CHUNKS][4];
#pragma unroll
    for (int k = 0; k < ROW_CACHE_CHUNKS; k++) {
        const int c = threadIdx.x + k * BNB_THREADS;
        if (c < chunks) {
            AsHalf<In>::chunk(xr + 8 * c, cache[k]);
#pragma unroll
            for (int j = 0; j < 8; j++) m = absmax_bits(m, cache[k][j >> 1] >> (16 * (j & 1)), 8 * c + j, threshold, col_flags);
        }
    }
    for (int c = threadIdx.x + ROW_CACHE_CHUNKS * BNB_THREADS; c < chunks; c += BNB_THREADS) {
        u32 h[4];
        AsHalf<In>::chunk(xr + 8 * c, h);
#pragma unroll
        for (int j = 0; j < 8; j++) m = absmax_bits(m, h[j >> 1] >> (16 * (j & 1)), 8 * c + j, threshold, col_flags);
    }
    if (!vectorized) {
        for (int c = threadIdx.x; c < cols; c += BNB_THREADS) m = absmax_bits(m, AsHalf<In>::one(xr[c]), c, threshold, col_flags);
    }
    m = cta_max_int(m, scratch);

    // The fp16 row max starts from -0.0 (bitsandbytes casts -FLT_MIN to half): a row with nothing
    // counted keeps SCB = -0.0. __fdividef(127, absmax) is fl32(127 * rcp.approx(absmax)).
    const float row_absmax = m < 0 ? -0.0f : f16_to_f32(u16(m));
    const float scale = mul_rn(127.0f, rcp_approx_ftz(row_absmax));
    if (threadIdx.x == 0) scb[blockIdx.x] = row_absmax;

    // Pass 2: the codes.
#pragma unroll
    for (int k = 0; k < ROW_CACHE_CHUNKS; k++) {
        const int c = threadIdx.x + k * BNB_THREADS;
        if (c < chunks) {
            u32 q[2] = {0u, 0u};
#pragma unroll
            for (int j = 0; j < 8; j++)
                q[j >> 2] |= (u32(quantize_one(cache[k][j >> 1] >> (16 * (j & 1)), scale, threshold)) & 0xffu) << (8 * (j & 3));
            st_v2(out + 8 * c, U32x2{q[0], q[1]});
        }
    }
    for (int c = threadIdx.x + ROW_CACHE_CHUNKS * BNB_THREADS; c < chunks; c += BNB_THREADS) {
        u32 h[4];
        AsHalf<In>::chunk(xr + 8 * c, h);
        u32 q[2] = {0u, 0u};
#pragma unroll
        for (int j = 0; j < 8; j++)
            q[j >> 2] |= (u32(quantize_one(h[j >> 1] >> (16 * (j & 1)), scale, threshold)) & 0xffu) << (8 * (j & 3));
        st_v2(out + 8 * c, U32x2{q[0], q[1]});
    }
    if (!vectorized) {
        for (int c = threadIdx.x; c < cols; c += BNB_THREADS)
            out[c] = i8(quantize_one(AsHalf<In>::one(xr[c]), scale, threshold));
    }
}

// out = fl32(fl32(q * SCB[row]) * fl32(1/127)): two IEEE multiplies (torch's `A * stats * 7.874e-3`),
// never a division by 127 and never fused. 16 elements per thread.
#define INT8_INV_127_BITS 0x3C010204u

__global__ void __launch_bounds__(BNB_THREADS)
    kInt8RowDequant(const i8* __restrict__ cb, const float* __restrict__ scb, i64 n, int cols, float* __restrict__ out) {
    const i64 i0 = (i64(blockIdx.x) * BNB_THREADS + threadIdx.x) * 16;
    if (i0 >= n) return;
    const float inv127 = u2f(INT8_INV_127_BITS);
    u32 w[4];
    if (i0 + 16 <= n) {
        const U32x4 raw = ld_v4(cb + i0);
        w[0] = raw.x, w[1] = raw.y, w[2] = raw.z, w[3] = raw.w;
    } else {
        u8 b[16];
#pragma unroll
        for (int k = 0; k < 16; k++) b[k] = (i0 + k < n) ? u8(cb[i0 + k]) : u8(0);
#pragma unroll
        for (int k = 0; k < 4; k++)
            w[k] = b[4 * k] | (u32(b[4 * k + 1]) << 8) | (u32(b[4 * k + 2]) << 16) | (u32(b[4 * k + 3]) << 24);
    }
    i64 row = i0 / cols;
    i64 row_end = (row + 1) * cols;
    float row_scale = scb[row];
    float v[16];
#pragma unroll
    for (int j = 0; j < 16; j++) {
        while (i0 + j >= row_end && i0 + j < n) {  // rows shorter than 16 elements cross more than once
            row++;
            row_end += cols;
            row_scale = scb[row];
        }
        const float q = float(i32(i8(u8(w[j >> 2] >> (8 * (j & 3))))));
        v[j] = mul_rn(mul_rn(q, row_scale), inv127);
    }
    if (i0 + 16 <= n) {
#pragma unroll
        for (int k = 0; k < 4; k++)
            st_v4(out + i0 + 4 * k, U32x4{f2u(v[4 * k]), f2u(v[4 * k + 1]), f2u(v[4 * k + 2]), f2u(v[4 * k + 3])});
    } else {
#pragma unroll
        for (int j = 0; j < 16; j++)
            if (i0 + j < n) out[i0 + j] = v[j];
    }
}
