// Blockwise quantization: 4-bit NF4/FP4 (packed two codes per byte) and 8-bit with the signed dynamic
// map, one float32 absmax per block. Bytes of bitsandbytes' kQuantizeBlockwise<T, B, N, 0, NF4|FP4|
// General8bit>; CPU twin: bnbcli/formats/blocks.py reference_quantize_blocks with the encoders of
// fourbit.py / blockwise8.py.
//
// Launch: 256-thread CTAs over tiles of 4096 elements, each thread 16 consecutive elements (two or
// four 16-byte loads), a grid-stride loop over the tiles with the next tile's loads in flight while
// the current one is encoded. A quantization block is blocksize/16 consecutive threads (2 ... 256):
// its absmax is a shuffle reduction, across warps through shared memory for blocksize >= 1024.
//
// Double quantization's second level runs this kernel on the absmax with the Dyn8L1 encoder, centered
// on torch's mean: kTorchMeanPartials (torch_mean.cuh, compiled into this module) launches first.
#include "bnb_common.cuh"
#include "torch_mean.cuh"

#define TILE_ELEMENTS (BNB_THREADS * 16)

// ------------------------------------------------------------------------------------------------
// 4-bit encoders. The decision trees of dQuantizeNF4/dQuantizeFP4 are "count the float32 thresholds
// strictly below x" (ties go down). The scaled value s lies in [-1-3e-7, 1+3e-7] or is NaN (x * rcp(
// absmax) with |x| <= absmax; 0*inf and inf*0 give NaN). Cut that range into 31 buckets of width
// 1/15, narrower than the smallest gap between thresholds (NF4 0.080, FP4 0.083), so a bucket holds
// at most one threshold: code = lo or hi, decided by one comparison with that threshold. Lane k of
// every warp holds bucket k's (lo | hi << 4) and threshold (cuda_tables.py builds and checks them);
// an element fetches its bucket's entry with two shuffles. Bucket 31 is NaN's: code 0.

// fma(key, 15, 1.5*2^23 + bias) rounds key*15 + bias to an integer held in the low mantissa bits; the
// product and sum are exact in the fma, so this one rounding is the only one. bits - 0x4B400000 is
// that integer (0 ... 30 for |key| <= 1+3e-7), and any NaN lands far above it: min(., 31) -> 31.
#define BUCKET_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define BUCKET_MAGIC_BITS 0x4B400000u

struct LaneLut {
    u32 codes;  // this lane's bucket: code below its threshold (bits 0-3), above it (bits 4-7)
    float thr;
    __device__ void init(const u32* table) {
        const int lane = threadIdx.x & 31;
        codes = table[lane];
        thr = u2f(table[32 + lane]);
    }
    __device__ __forceinline__ u32 lookup(float key, float bias) const {
        const u32 k = f2u(fma_rn(key, 15.0f, BUCKET_MAGIC + bias)) - BUCKET_MAGIC_BITS;
        const int bucket = int(min(k, 31u));
        const u32 c = __shfl_sync(BNB_FULL_MASK, codes, bucket);
        const float t = __shfl_sync(BNB_FULL_MASK, thr, bucket);
        return (key > t ? c >> 4 : c) & 15u;  // strict >: a value on the threshold keeps the lower code
    }
};

struct Nf4 {
    enum { BITS = 4 };
    LaneLut lut;
    __device__ void init(const u32* table) { lut.init(table); }
    // Buckets over s in [-1, 1]: bias 15 maps s = -1 to 0 and s = 1 to 30.
    __device__ __forceinline__ u32 encode(float s) const { return lut.lookup(s, 15.0f); }
};

struct Fp4 {
    enum { BITS = 4 };
    LaneLut lut;
    __device__ void init(const u32* table) { lut.init(table); }
    // dQuantizeFP4: sign bit from s < 0 (so -0.0, and a product flushed to -0.0, keep sign 0), then the
    // magnitude tree on |s| (buckets 0 ... 15 over [0, 1]).
    __device__ __forceinline__ u32 encode(float s) const {
        const u32 sign = s < 0.0f ? 8u : 0u;
        return sign | lut.lookup(fabsf(s), 0.0f);
    }
};

// ------------------------------------------------------------------------------------------------
// 8-bit dynamic map: 255 thresholds, log-spaced, so buckets follow the float32 bits instead. A bucket
// is the high 16 bits (sign, exponent, 7 mantissa bits) and holds at most one threshold; the shared
// table holds, per bucket, bnbcli's CodeTable offset: byte 2 of (offset + v), v = bits ^ (bits >> 31),
// is the code (the low 16 bits carry into byte 2 exactly when the value passes the bucket's
// threshold). |s| is first clamped to [2^-23, 1]: no threshold lies in (-2.7e-7, 2.7e-7) nor beyond
// +-1, so the clamp keeps every code (-0.0 and +0.0 both give 127) and the table needs only the
// buckets 0x3400 ... 0x3F80 of each sign (23.5 KB).
#define DYN8_LOW_BUCKET 0x3400u
#define DYN8_NEGATIVE 0xB81u      // index of the negative buckets: positive ones at 0 ... 0xB80
#define DYN8_TABLE_ENTRIES 0x1702  // 2 * 0xB81

// SHARED: the table is copied into shared memory once per CTA (large inputs: each CTA encodes many
// tiles); otherwise read through L1 from global memory, which saves that copy's latency where a CTA
// encodes one tile or two (the second level of double quantization: a million floats or fewer).
template <bool SHARED>
struct Dyn8Codes {
    enum { BITS = 8 };
    const i32* table;
    __device__ void init(const u32* global_table) {
        if (SHARED) {
            __shared__ i32 shared_table[DYN8_TABLE_ENTRIES];
            for (int i = threadIdx.x; i < DYN8_TABLE_ENTRIES; i += BNB_THREADS) shared_table[i] = i32(global_table[i]);
            __syncthreads();
            table = shared_table;
        } else {
            table = reinterpret_cast<const i32*>(global_table);
        }
    }
    __device__ __forceinline__ u32 encode(float s) const {
        const float a = fminf(fmaxf(fabsf(s), 0x1p-23f), 1.0f);  // NaN becomes 2^-23 here, 0 below
        const u32 negative = u32(i32(f2u(s)) >> 31);             // all ones when s < 0 (or -0.0)
        // v = bits ^ (bits >> 31) for bits = copysign(a, s): ascending order within a bucket, either sign.
        const u32 v = f2u(a) ^ (negative & 0x7fffffffu);
        const u32 index = (f2u(a) >> 16) - DYN8_LOW_BUCKET + (negative & DYN8_NEGATIVE);
        const u32 entry = SHARED ? u32(table[index]) : ld_u32(table + index);
        const u32 code = ((entry + v) >> 16) & 0xffu;
        return is_nan(s) ? 0u : code;  // dQuantize's binary search fails every test on NaN
    }
};
typedef Dyn8Codes<true> Dyn8;
typedef Dyn8Codes<false> Dyn8L1;

// ------------------------------------------------------------------------------------------------
// Code stores: 16 codes of one thread. 4-bit: element 2j in the high nibble of byte j.

template <int BITS>
struct StoreCodes;

template <>
struct StoreCodes<4> {
    u32 w[2] = {0u, 0u};  // 8 bytes, little-endian
    __device__ void put(int j, u32 code) {  // j = 0 ... 15, a constant once unrolled
        w[j >> 3] |= code << (8 * ((j >> 1) & 3) + ((j & 1) ? 0 : 4));
    }
    __device__ void store(u8* out, i64 i0, i64 n) const {
        u8* dst = out + (i0 >> 1);
        if (i0 + 16 <= n) {
            st_v2(dst, U32x2{w[0], w[1]});
        } else {  // (n + 1) / 2 bytes in all; an odd n keeps the padding zero's code in its last nibble
            const i64 bytes = (n + 1) / 2 - (i0 >> 1);
#pragma unroll
            for (int b = 0; b < 8; b++)
                if (b < bytes) dst[b] = u8(w[b >> 2] >> (8 * (b & 3)));
        }
    }
};

template <>
struct StoreCodes<8> {
    u32 w[4] = {0u, 0u, 0u, 0u};
    __device__ void put(int j, u32 code) { w[j >> 2] |= code << (8 * (j & 3)); }
    __device__ void store(u8* out, i64 i0, i64 n) const {
        u8* dst = out + i0;
        if (i0 + 16 <= n) {
            st_v4(dst, U32x4{w[0], w[1], w[2], w[3]});
        } else {
#pragma unroll
            for (int b = 0; b < 16; b++)
                if (i0 + b < n) dst[b] = u8(w[b >> 2] >> (8 * (b & 3)));
        }
    }
};

// ------------------------------------------------------------------------------------------------
// The kernel

// A thread's 16 values as float32: the input, minus the offset when `centered` (padding past n stays
// 0, as bitsandbytes pads the tail after subtracting).
template <class In>
__device__ __forceinline__ void values(const Load16<In>& raw, i64 i0, i64 n, bool centered, float off,
                                       float v[16]) {
    raw.to_f32(v);
    if (centered) {
#pragma unroll
        for (int j = 0; j < 16; j++) v[j] = (i0 + j < n) ? sub_rn(v[j], off) : 0.0f;
    }
}

// max |v| of a thread's values with fmaxf semantics from -FLT_MAX, as kQuantizeBlockwise starts: a
// block of NaNs only keeps -FLT_MAX, and fp32/bf16 subnormals count as 0.
template <class In>
__device__ __forceinline__ float partial_absmax(const Load16<In>& raw, i64 i0, i64 n, bool centered, float off) {
    float v[16];
    values(raw, i0, n, centered, off, v);
    float m = -BNB_FLT_MAX;
#pragma unroll
    for (int j = 0; j < 16; j++) m = max_ftz(m, fabsf(v[j]));
    return m;
}

// x: n elements of In. mean_partials: null, or the per-CTA sums of kTorchMeanPartials over x (ctas,
// width, factor as there): every element is then centered on x's torch mean first, since the second
// level of double quantization quantizes absmax - mean, and CTA 0 stores that mean in *offset_out.
// out: packed codes ((n+1)/2 bytes for 4-bit, n for 8-bit). absmax: ceil(n / blocksize) floats.
// map_out: the record's own copy of its code map (map_len <= 256 floats from map_src: the NF4/FP4
// values or the dynamic map), written by CTA 0 so that no separate copy is launched for it.
//
// Pipelining: a thread's partial absmax of the next tile is taken at the end of the current one,
// after its codes are stored, so the loads of tile i+1 have the whole encode of tile i to arrive and
// the reduction of tile i+1 (one barrier for blocksize >= 1024) never waits on memory. (Measured on
// an H100: blockwise 8-bit at blocksize 4096 98 -> 92 us; a variant that pipelines only the barrier
// case ran that case at 103 us and nothing else faster.)
template <class In, class Enc>
__global__ void __launch_bounds__(BNB_THREADS, 4)
    kQuantizeBlockwise(const typename In::storage* __restrict__ x, i64 n, int log2_blocksize,
                       const float* __restrict__ mean_partials, int mean_ctas, int mean_width, float mean_factor,
                       float* __restrict__ offset_out, const u32* __restrict__ enc_table,
                       const float* __restrict__ map_src, int map_len, float* __restrict__ map_out,
                       u8* __restrict__ out, float* __restrict__ absmax) {
    __shared__ float scratch[2][BNB_THREADS / 32];
    if (blockIdx.x == 0 && int(threadIdx.x) < map_len) map_out[threadIdx.x] = map_src[threadIdx.x];
    const i64 tiles = (n + TILE_ELEMENTS - 1) / TILE_ELEMENTS;
    const i64 first = blockIdx.x;
    Load16<In> cur, next;
    if (first < tiles) cur.issue(x, first * TILE_ELEMENTS + threadIdx.x * 16, n);  // in flight during init
    Enc enc;
    enc.init(enc_table);
    const bool centered = mean_partials != nullptr;
    float off = 0.0f;
    if (centered) {  // every CTA folds the partial sums itself (a few hundred floats, from L2)
        __shared__ float fold[BNB_THREADS];
        off = torch_mean_total(mean_partials, mean_ctas, mean_width, mean_factor, fold);
        if (blockIdx.x == 0 && threadIdx.x == 0) *offset_out = off;
    }
    const int group = 1 << (log2_blocksize - 4);  // threads per quantization block (16 elements each)
    const i64 blocks = (n + (i64(1) << log2_blocksize) - 1) >> log2_blocksize;

    float partial = first < tiles ? partial_absmax(cur, first * TILE_ELEMENTS + threadIdx.x * 16, n, centered, off) : 0.0f;
    int parity = 0;
    for (i64 tile = first; tile < tiles; tile += gridDim.x, parity ^= 1) {
        const i64 i0 = tile * TILE_ELEMENTS + threadIdx.x * 16;
        const i64 i0_next = (tile + gridDim.x) * TILE_ELEMENTS + threadIdx.x * 16;
        const bool more = tile + gridDim.x < tiles;
        if (more) next.issue(x, i0_next, n);

        const float m = cta_group_max(partial, group, scratch[parity]);
        const i64 block = i0 >> log2_blocksize;
        if ((threadIdx.x & (group - 1)) == 0 && block < blocks) absmax[block] = m;

        // Multiply by the approximate reciprocal, never divide: absmax 0 gives inf and 0*inf = NaN,
        // which encodes as 0.
        const float r = rcp_approx_ftz(m);
        float v[16];
        values(cur, i0, n, centered, off, v);
        StoreCodes<Enc::BITS> codes;
#pragma unroll
        for (int j = 0; j < 16; j++) codes.put(j, enc.encode(mul_ftz(v[j], r)));
        codes.store(out, i0, n);

        if (more) partial = partial_absmax(next, i0_next, n, centered, off);
        cur = next;
    }
}
