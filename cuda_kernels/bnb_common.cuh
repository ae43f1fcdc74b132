// Shared device helpers for the bnbcli kernels: exact float32 arithmetic as explicit PTX, 16-bit
// float conversions, 16-byte vector memory access, and group/block max reductions.
//
// Why explicit PTX: the kernels must give the bytes of bitsandbytes' CUDA kernels, which nvcc built
// with --use_fast_math. Writing the instructions out (rcp.approx.ftz, mul.rn.ftz, ...) makes every
// result independent of the flags this file is compiled with (NVRTC, nvcc, with or without
// --use_fast_math or --fmad). An operation with an explicit rounding modifier (.rn) is never fused
// into an fma by ptxas, so a multiply followed by an add stays two roundings where the reference
// rounds twice.
//
// No #include: NVRTC compiles these without the CUDA headers; fp16/bf16 travel as raw 16-bit bits.
#pragma once

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

struct __align__(16) U32x4 {
    u32 x, y, z, w;
};
struct __align__(8) U32x2 {
    u32 x, y;
};

#define BNB_FLT_MAX 3.402823466e38f
#define BNB_FULL_MASK 0xffffffffu
#define BNB_THREADS 256  // every kernel runs 256-thread CTAs (8 warps)

// ------------------------------------------------------------------------------------------------
// The PTX primitives. Everything rounding-sensitive or memory-width-sensitive the kernels do goes
// through these. tests/helpers/cuda_host_shim.h defines BNB_HOST_EMULATION and supplies C++ twins of exactly
// this block, so the kernel logic (indexing, tails, packing, reductions) can run on a CPU in tests.
#ifndef BNB_HOST_EMULATION

__device__ __forceinline__ u32 f2u(float f) { return __float_as_uint(f); }
__device__ __forceinline__ float u2f(u32 u) { return __uint_as_float(u); }

// float32 arithmetic, spelled as the instruction the reference models

// bitsandbytes' `1.0f / absmax` under --use_fast_math: approximate reciprocal (<= 1 ulp from IEEE),
// subnormal input and result flushed to zero. The CPU twin is gpu_math.rcp_approx (table measured
// from this very instruction on sm_90).
__device__ __forceinline__ float rcp_approx_ftz(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Fast-math product: subnormal inputs and result flushed to sign-preserving zero (gpu_math.mul_ftz).
__device__ __forceinline__ float mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// IEEE product with subnormals kept: what torch's (non-fast-math) kernels compute.
__device__ __forceinline__ float mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// IEEE sum/difference with subnormals kept (torch's `absmax += offset`, `absmax - offset`).
__device__ __forceinline__ float add_rn(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// fmaxf under fast math: a NaN operand loses (so NaN inputs never become the absmax) and subnormal
// operands count as zero (the kernel reads fp32/bf16 subnormals as 0).
__device__ __forceinline__ float max_ftz(float a, float b) {
    float r;
    asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// One rounding of a*b+c. Only used for index arithmetic whose exactness is argued where it is used.
__device__ __forceinline__ float fma_rn(float a, float b, float c) {
    float r;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
}

// Round half to even to int32 (__float2int_rn); NaN gives 0.
__device__ __forceinline__ i32 f2i_rn(float f) {
    i32 q;
    asm("cvt.rni.s32.f32 %0, %1;" : "=r"(q) : "f"(f));
    return q;
}

// ------------------------------------------------------------------------------------------------
// 16-bit floats as raw bits. Widening is exact; narrowing is one round-to-nearest-even, and every
// NaN becomes 0x7fff (gpu_math.gpu_cast), as __float2half_rn / __nv_bfloat16(float) write it.

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// Two conversions in one instruction (F2FP.PACK_AB, the same unit as the scalar form): `lo` lands in
// the low half, i.e. at the lower address.
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// ------------------------------------------------------------------------------------------------
// 16-byte and 8-byte global memory access, spelled out so the width never depends on the compiler.
// Inputs are read through the non-coherent path (they are never written by the same kernel).
// BNB_LD_HINT / BNB_ST_HINT: PTX cache qualifiers for those loads and stores. Outputs are stored
// ".cs" (streaming: written once, evicted first), which on an H100 took int8 row-wise 77.7 -> 75.3 us,
// blockwise8 89.6 -> 89.0 and nf4 dequantize 60.8 -> 60.5 (nothing slower); loads take no hint (".L2::256B"
// gained nothing, ".L1::no_allocate" lost). `bench/bench_kernels_cuda.py --hints` compares the builds.
#ifndef BNB_LD_HINT
#define BNB_LD_HINT ""
#endif
#ifndef BNB_ST_HINT
#define BNB_ST_HINT ".cs"
#endif

__device__ __forceinline__ U32x4 ld_v4(const void* p) {
    U32x4 r;
    asm("ld.global.nc" BNB_LD_HINT ".v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}
__device__ __forceinline__ u32 ld_u32(const void* p) {
    u32 r;
    asm("ld.global.nc" BNB_LD_HINT ".u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ U32x2 ld_v2(const void* p) {
    U32x2 r;
    asm("ld.global.nc" BNB_LD_HINT ".v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}
__device__ __forceinline__ void st_v4(void* p, U32x4 v) {
    asm volatile("st.global" BNB_ST_HINT ".v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}
__device__ __forceinline__ void st_v2(void* p, U32x2 v) {
    asm volatile("st.global" BNB_ST_HINT ".v2.u32 [%0], {%1, %2};" ::"l"(p), "r"(v.x), "r"(v.y) : "memory");
}

#endif  // BNB_HOST_EMULATION

__device__ __forceinline__ bool is_nan(float f) { return f != f; }
__device__ __forceinline__ float bf16_to_f32(u16 h) { return u2f(u32(h) << 16); }  // exact

// The element types, as tags. `storage` is what one element occupies in memory.
struct F16 {
    typedef u16 storage;
    __device__ static float to_f32(u16 h) { return f16_to_f32(h); }
    __device__ static u16 from_f32(float f) { return f32_to_f16(f); }
    __device__ static u32 pack2(float lo, float hi) { return pack_f16x2(lo, hi); }
};
struct BF16 {
    typedef u16 storage;
    __device__ static float to_f32(u16 h) { return bf16_to_f32(h); }
    __device__ static u16 from_f32(float f) { return f32_to_bf16(f); }
    __device__ static u32 pack2(float lo, float hi) { return pack_bf16x2(lo, hi); }
};
struct F32 {
    typedef float storage;
    __device__ static float to_f32(float f) { return f; }
    __device__ static float from_f32(float f) { return f; }
};

// Sixteen consecutive input elements as float32, the 16-byte loads issued first. Elements at or past
// `n` read as 0.0f: bitsandbytes' kernels load the tail block's padding as zeros, which then take
// part in its absmax.
template <class In>
struct Load16;

template <class Half>
struct Load16Half {
    U32x4 raw[2];
    __device__ void issue(const u16* x, i64 i0, i64 n) {
        if (i0 + 16 <= n) {
            raw[0] = ld_v4(x + i0);
            raw[1] = ld_v4(x + i0 + 8);
        } else {  // the one partial vector of the tensor: element by element
            u16 h[16];
#pragma unroll
            for (int j = 0; j < 16; j++) h[j] = (i0 + j < n) ? x[i0 + j] : u16(0);
#pragma unroll
            for (int k = 0; k < 2; k++) {
                raw[k].x = h[8 * k + 0] | (u32(h[8 * k + 1]) << 16);
                raw[k].y = h[8 * k + 2] | (u32(h[8 * k + 3]) << 16);
                raw[k].z = h[8 * k + 4] | (u32(h[8 * k + 5]) << 16);
                raw[k].w = h[8 * k + 6] | (u32(h[8 * k + 7]) << 16);
            }
        }
    }
    __device__ void to_f32(float v[16]) const {  // little-endian: the lower element is the low half
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const u32 w[4] = {raw[k].x, raw[k].y, raw[k].z, raw[k].w};
#pragma unroll
            for (int j = 0; j < 4; j++) {
                v[8 * k + 2 * j] = Half::to_f32(u16(w[j] & 0xffffu));
                v[8 * k + 2 * j + 1] = Half::to_f32(u16(w[j] >> 16));
            }
        }
    }
};
template <>
struct Load16<F16> : Load16Half<F16> {};
template <>
struct Load16<BF16> : Load16Half<BF16> {};

template <>
struct Load16<F32> {
    U32x4 raw[4];
    __device__ void issue(const float* x, i64 i0, i64 n) {
        if (i0 + 16 <= n) {
#pragma unroll
            for (int k = 0; k < 4; k++) raw[k] = ld_v4(x + i0 + 4 * k);
        } else {
            float f[16];
#pragma unroll
            for (int j = 0; j < 16; j++) f[j] = (i0 + j < n) ? x[i0 + j] : 0.0f;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                raw[k].x = f2u(f[4 * k + 0]);
                raw[k].y = f2u(f[4 * k + 1]);
                raw[k].z = f2u(f[4 * k + 2]);
                raw[k].w = f2u(f[4 * k + 3]);
            }
        }
    }
    __device__ void to_f32(float v[16]) const {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[4 * k + 0] = u2f(raw[k].x);
            v[4 * k + 1] = u2f(raw[k].y);
            v[4 * k + 2] = u2f(raw[k].z);
            v[4 * k + 3] = u2f(raw[k].w);
        }
    }
};

// ------------------------------------------------------------------------------------------------
// Reductions. max is exact and order-free, so any tree gives the reference's absmax.

// Max over aligned groups of `lanes` consecutive lanes (a power of two <= 32), result in every lane.
__device__ __forceinline__ float group_max(float m, int lanes) {
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        if (offset < lanes) m = max_ftz(m, __shfl_xor_sync(BNB_FULL_MASK, m, offset));
    }
    return m;
}

// Max over aligned groups of `threads` consecutive threads of a 256-thread CTA (any power of two
// from 1 to 256). Every thread of the CTA must call it. Groups wider than a warp meet in `scratch`
// behind one barrier; callers alternate between two scratch arrays on successive calls, so no second
// barrier is needed before the array is written again (a warp can only come back to it after every
// warp has passed the next call's barrier, i.e. after every read of this call).
__device__ __forceinline__ float cta_group_max(float m, int threads, float* scratch /* [8] shared */) {
    if (threads <= 32) return group_max(m, threads);
    m = group_max(m, 32);
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) scratch[warp] = m;
    __syncthreads();
    const int warps = threads >> 5;
    const int first = warp & ~(warps - 1);
    float g = scratch[first];
    for (int k = 1; k < warps; k++) g = max_ftz(g, scratch[first + k]);
    return g;
}
