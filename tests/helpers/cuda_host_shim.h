// Runs the kernels of cuda_kernels/ on a CPU, for tests only (tests/conformance/test_cuda_emulated.py).
//
// Force-included (g++ -include) before a kernel source. It defines BNB_HOST_EMULATION, so
// bnb_common.cuh leaves out its PTX block, and supplies C++ twins of those primitives plus the CUDA
// execution model the kernels use: a CTA is 256 std::threads; __syncthreads is a 256-thread barrier,
// warp shuffles and reductions exchange through a per-warp slot array between two 32-thread barriers;
// __shared__ variables are statics (CTAs run one after another). What this checks is the kernels'
// logic (indexing, tails, packing, reductions, tables); the real instructions are checked on a GPU.
#pragma once
#define BNB_HOST_EMULATION 1

#include <barrier>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim3 threadIdx;
inline thread_local Dim3 blockIdx;
inline Dim3 gridDim;

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

// --- execution model ----------------------------------------------------------------------------

inline std::barrier<>& cta_barrier() {
    static std::barrier<> b(256);
    return b;
}
struct WarpExchange {
    std::barrier<> sync{32};
    uint32_t slot[32];
};
inline WarpExchange& warp_exchange() {
    static WarpExchange warps[8];
    return warps[threadIdx.x >> 5];
}
inline void __syncthreads() { cta_barrier().arrive_and_wait(); }

template <class T>
inline T shfl_from(T v, int src_lane) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    WarpExchange& w = warp_exchange();
    std::memcpy(&w.slot[threadIdx.x & 31], &v, 4);
    w.sync.arrive_and_wait();
    T r;
    std::memcpy(&r, &w.slot[src_lane & 31], 4);
    w.sync.arrive_and_wait();
    return r;
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane) { return shfl_from(v, src_lane); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) { return shfl_from(v, int(threadIdx.x & 31) ^ mask); }
inline int __reduce_max_sync(unsigned, int v) {
    int m = v;
    for (int lane = 0; lane < 32; lane++) m = max(m, shfl_from(v, lane));
    return m;
}

// Runs `body` as `grid` CTAs of 256 threads, one CTA at a time.
inline void emulate_launch(int grid, const std::function<void()>& body) {
    gridDim.x = unsigned(grid);
    for (int b = 0; b < grid; b++) {
        std::vector<std::thread> threads;
        threads.reserve(256);
        for (int t = 0; t < 256; t++)
            threads.emplace_back([&, b, t] {
                blockIdx.x = unsigned(b);
                threadIdx.x = unsigned(t);
                body();
            });
        for (auto& th : threads) th.join();
    }
}

// --- the PTX primitives -------------------------------------------------------------------------

typedef unsigned int u32_;
inline u32_ f2u(float f) {
    u32_ u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float u2f(u32_ u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float ftz(float x) { return std::fabs(x) < 1.17549435e-38f ? std::copysign(0.0f, x) : x; }
// GPU float arithmetic writes every NaN result as 0x7fffffff (x86 writes 0xffc00000).
inline float canon(float x) { return std::isnan(x) ? u2f(0x7fffffffu) : x; }

// rcp.approx.ftz.f32: RN(1/x) moved by the measured ulp step of x's mantissa (set by the test from
// bnbcli/data/rcp_approx_sm90.npz), as gpu_math.rcp_approx computes it.
inline const int8_t* rcp_step_table = nullptr;
extern "C" void set_rcp_steps(const int8_t* steps) { rcp_step_table = steps; }
inline float rcp_approx_ftz(float x) {
    x = ftz(x);
    const float exact = 1.0f / x;
    if (!std::isfinite(exact) || exact == 0.0f) return canon(exact);
    return ftz(u2f(f2u(exact) + u32_(int32_t(rcp_step_table[f2u(x) & 0x7fffffu]))));
}
inline float mul_ftz(float a, float b) { return canon(ftz(ftz(a) * ftz(b))); }
inline float mul_rn(float a, float b) { return canon(a * b); }  // built with -ffp-contract=off
inline float add_rn(float a, float b) { return canon(a + b); }
inline float sub_rn(float a, float b) { return canon(a - b); }
inline float max_ftz(float a, float b) { return canon(std::fmax(ftz(a), ftz(b))); }
inline float fma_rn(float a, float b, float c) { return canon(std::fma(a, b, c)); }
inline int f2i_rn(float f) {
    if (std::isnan(f)) return 0;
    const float r = std::nearbyint(f);  // round half to even in the default rounding mode
    return r >= 2147483647.0f ? 2147483647 : r <= -2147483648.0f ? int(-2147483647 - 1) : int(r);
}

inline float f16_to_f32(unsigned short h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return float(f);
}
inline unsigned short f32_to_f16(float f) {
    if (std::isnan(f)) return 0x7fff;  // the GPU's canonical NaN
    const _Float16 h = _Float16(f);  // round to nearest even, overflow to inf
    unsigned short r;
    std::memcpy(&r, &h, 2);
    return r;
}
inline unsigned short f32_to_bf16(float f) {
    if (std::isnan(f)) return 0x7fff;
    const u32_ u = f2u(f);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline u32_ pack_f16x2(float lo, float hi) { return f32_to_f16(lo) | (u32_(f32_to_f16(hi)) << 16); }
inline u32_ pack_bf16x2(float lo, float hi) { return f32_to_bf16(lo) | (u32_(f32_to_bf16(hi)) << 16); }

struct alignas(16) U32x4;
struct alignas(8) U32x2;
template <class V>
inline V load_vector(const void* p) {
    if (reinterpret_cast<uintptr_t>(p) % sizeof(V)) std::abort();  // the GPU faults on a misaligned vector
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}
#define ld_v4(p) load_vector<U32x4>(p)
#define ld_u32(p) load_vector<unsigned int>(p)
#define ld_v2(p) load_vector<U32x2>(p)
template <class V>
inline void st_v4(void* p, V v) {
    if (reinterpret_cast<uintptr_t>(p) % 16) std::abort();
    std::memcpy(p, &v, 16);
}
template <class V>
inline void st_v2(void* p, V v) {
    if (reinterpret_cast<uintptr_t>(p) % 8) std::abort();
    std::memcpy(p, &v, 8);
}
