// Blockwise dequantization: 4-bit NF4/FP4 and 8-bit dynamic codes back to fp16/bf16/fp32, with the
// double-quantized absmax rebuilt on the fly. Bytes of bitsandbytes' kDequantizeBlockwise (plus, for
// double quantization, its dequantize_blockwise of the absmax and torch's `absmax += offset`); CPU
// twins: fourbit.dequantize_4bit, blockwise8.dequantize_blockwise8.
//
// Arithmetic, as the reference orders it:
//   block scale  = absmax[b]                                  (plain), or
//                = fl32(fl32(code[qabsmax[b]] * nested_absmax[b >> log2_nested]) + offset)
//                  a fast-math (ftz) multiply, then a separate IEEE add: two roundings, never an fma
//   value        = fl32(lut[code] * scale), ftz;  then one round-to-nearest-even to the output dtype.
//
// Launch: a grid covering the tensor, 256-thread CTAs; each thread takes 32 elements (4-bit) or 16
// (8-bit) as chunks of 8 spread so that a warp's loads and stores are contiguous. A chunk never
// straddles a quantization block (blocksize >= 32), so it needs one block scale. The code table sits
// in shared memory: 16 entries fill 16 distinct banks (no conflicts), 256 entries cost a few.
#include "bnb_common.cuh"

__device__ __forceinline__ float block_scale(i64 block, const float* absmax, const u8* qabsmax,
                                             const float* nested_absmax, const float* nested_code,
                                             int log2_nested, float nested_offset) {
    if (absmax) return absmax[block];
    const float nested = mul_ftz(nested_code[qabsmax[block]], nested_absmax[block >> log2_nested]);
    return add_rn(nested, nested_offset);
}

// Stores 8 float32 values at out[e0 ...] (e0 a multiple of 8), converted to Out; past n nothing is
// written. One 16-byte store for fp16/bf16 (two for fp32): lanes of a warp store adjacent runs.
template <class Out>
struct Store8;

template <class Half>
struct Store8Half {
    __device__ static void store(u16* out, i64 e0, i64 n, const float v[8]) {
        if (e0 + 8 <= n) {
            st_v4(out + e0, U32x4{Half::pack2(v[0], v[1]), Half::pack2(v[2], v[3]), Half::pack2(v[4], v[5]),
                                  Half::pack2(v[6], v[7])});
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (e0 + j < n) out[e0 + j] = Half::from_f32(v[j]);
        }
    }
};
template <>
struct Store8<F16> : Store8Half<F16> {};
template <>
struct Store8<BF16> : Store8Half<BF16> {};

template <>
struct Store8<F32> {
    __device__ static void store(float* out, i64 e0, i64 n, const float v[8]) {
        if (e0 + 8 <= n) {
            st_v4(out + e0, U32x4{f2u(v[0]), f2u(v[1]), f2u(v[2]), f2u(v[3])});
            st_v4(out + e0 + 4, U32x4{f2u(v[4]), f2u(v[5]), f2u(v[6]), f2u(v[7])});
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (e0 + j < n) out[e0 + j] = v[j];
        }
    }
};

// Chunk k of thread t covers the 8 elements from tile + k * 8 * BNB_THREADS + 8 * t: consecutive lanes
// read and write consecutive runs, so every load and store instruction of a warp is one contiguous span.
#define CHUNK_STRIDE (8 * BNB_THREADS)
#define DEQUANT4_CHUNKS 4  // 32 elements (16 packed bytes) per thread
#define DEQUANT8_CHUNKS 2  // 16 elements (16 code bytes) per thread

// packed: (n+1)/2 bytes (two codes per byte, element 2j in the high nibble). lut: the 16 float32
// values the CUDA dequantizer multiplies (FP4: code 8 is -0.0). Plain: absmax != null; double
// quantization: absmax == null and qabsmax/nested_absmax/nested_code/nested_offset describe it, the
// offset read from *nested_offset_at when that is given (a mean still on the device: the caller need
// not wait for it).
template <class Out>
__global__ void __launch_bounds__(BNB_THREADS)
    kDequantize4bit(const u8* __restrict__ packed, i64 n, int log2_blocksize, const float* __restrict__ lut,
                    const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, int log2_nested,
                    float nested_offset, const float* __restrict__ nested_offset_at,
                    typename Out::storage* __restrict__ out) {
    __shared__ float s_lut[16];
    if (threadIdx.x < 16) s_lut[threadIdx.x] = lut[threadIdx.x];
    if (nested_offset_at) nested_offset = *nested_offset_at;
    __syncthreads();
    const i64 tile = i64(blockIdx.x) * (DEQUANT4_CHUNKS * CHUNK_STRIDE);
    // Every load first (the chunks' packed words and block scales), then the arithmetic and stores.
    u32 w[DEQUANT4_CHUNKS];  // each chunk's 4 packed bytes, little-endian
    float scale[DEQUANT4_CHUNKS];
#pragma unroll
    for (int k = 0; k < DEQUANT4_CHUNKS; k++) {
        const i64 e0 = tile + k * CHUNK_STRIDE + 8 * threadIdx.x;
        w[k] = 0;
        scale[k] = 0.0f;
        if (e0 + 8 <= n) {
            w[k] = ld_u32(packed + (e0 >> 1));
        } else if (e0 < n) {  // the tensor's last partial chunk: only the bytes that exist
            const i64 bytes = (n + 1) / 2 - (e0 >> 1);
            for (int b = 0; b < 4; b++)
                if (b < bytes) w[k] |= u32(packed[(e0 >> 1) + b]) << (8 * b);
        }
        if (e0 < n)
            scale[k] = block_scale(e0 >> log2_blocksize, absmax, qabsmax, nested_absmax, nested_code, log2_nested,
                                   nested_offset);
    }
#pragma unroll
    for (int k = 0; k < DEQUANT4_CHUNKS; k++) {
        const i64 e0 = tile + k * CHUNK_STRIDE + 8 * threadIdx.x;
        if (e0 >= n) break;
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 byte = (w[k] >> (8 * j)) & 0xffu;
            v[2 * j] = mul_ftz(s_lut[byte >> 4], scale[k]);
            v[2 * j + 1] = mul_ftz(s_lut[byte & 15u], scale[k]);
        }
        Store8<Out>::store(out, e0, n, v);
    }
}

// codes: n bytes. code: the 256-entry map from the state (bitsandbytes' `code`). absmax or the nested
// description as above (the nested codes were quantized with `code` too).
template <class Out>
__global__ void __launch_bounds__(BNB_THREADS)
    kDequantize8bit(const u8* __restrict__ codes, i64 n, int log2_blocksize, const float* __restrict__ code,
                    const float* __restrict__ absmax, const u8* __restrict__ qabsmax,
                    const float* __restrict__ nested_absmax, int log2_nested, float nested_offset,
                    const float* __restrict__ nested_offset_at, typename Out::storage* __restrict__ out) {
    __shared__ float s_code[256];
    s_code[threadIdx.x] = code[threadIdx.x];  // BNB_THREADS == 256
    if (nested_offset_at) nested_offset = *nested_offset_at;
    __syncthreads();
    const i64 tile = i64(blockIdx.x) * (DEQUANT8_CHUNKS * CHUNK_STRIDE);
    u32 w[DEQUANT8_CHUNKS][2];
    float scale[DEQUANT8_CHUNKS];
#pragma unroll
    for (int k = 0; k < DEQUANT8_CHUNKS; k++) {
        const i64 e0 = tile + k * CHUNK_STRIDE + 8 * threadIdx.x;
        w[k][0] = w[k][1] = 0;
        scale[k] = 0.0f;
        if (e0 + 8 <= n) {
            const U32x2 raw = ld_v2(codes + e0);
            w[k][0] = raw.x, w[k][1] = raw.y;
        } else if (e0 < n) {
            for (int b = 0; b < 8; b++)
                if (e0 + b < n) w[k][b >> 2] |= u32(codes[e0 + b]) << (8 * (b & 3));
        }
        if (e0 < n)
            scale[k] = block_scale(e0 >> log2_blocksize, absmax, qabsmax, nested_absmax, code, log2_nested,
                                   nested_offset);
    }
#pragma unroll
    for (int k = 0; k < DEQUANT8_CHUNKS; k++) {
        const i64 e0 = tile + k * CHUNK_STRIDE + 8 * threadIdx.x;
        if (e0 >= n) break;
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = mul_ftz(s_code[(w[k][j >> 2] >> (8 * (j & 3))) & 0xffu], scale[k]);
        Store8<Out>::store(out, e0, n, v);
    }
}
