// Runs the kernels of cuda_kernels/ on a CPU, for tests only (tests/conformance/test_cuda_emulated.py).
//
// Force-included (g++ -include) before a kernel source. It defines BNB_HOST_EMULATION, so
// bnb_common.cuh leaves out its PTX block, and supplies C++ twins of those primitives plus the CUDA
// execution model the kernels use: a CTA is 256 threads, each a fiber (its own stack and registers,
// <ucontext.h>) run by one scheduler thread; a fiber runs until it waits at a barrier or returns.
// __syncthreads is a 256-thread barrier; warp shuffles and reductions exchange through per-warp
// slot arrays at a 32-thread barrier: no fiber passes a barrier before all of its threads have
// reached it, as on the GPU. The scheduler visits the fibers in alternating directions (0..255,
// then 255..0), so code that reads another thread's write without a barrier between them sees it
// both before and after that write. A barrier some threads never reach (the GPU hangs) aborts.
// __shared__ variables are statics (CTAs run one after another). What this checks is the kernels'
// logic (indexing, tails, packing, reductions, tables); the real instructions are checked on a GPU.
// Fibers rather than 256 std::threads: switching a fiber costs no thread start and no futex wake,
// which made the emulated tests CPU-bound on the operating system (about 75 CPU seconds before).
#pragma once
#define BNB_HOST_EMULATION 1

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
// One scheduler thread runs every fiber: it sets threadIdx before resuming one (swapcontext is an
// external call, so the kernels read it afresh after every barrier).
inline Dim3 threadIdx;
inline Dim3 blockIdx;
inline Dim3 gridDim;

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

// --- execution model ----------------------------------------------------------------------------

namespace emulation {
constexpr int kThreads = 256;
constexpr std::size_t kStackBytes = 256 * 1024;  // the kernels' locals are a few KB

// The threads [first, first + count) meet here: the CTA's, or one warp's.
struct Barrier {
    int first, count, arrived = 0;
};
struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack{new char[kStackBytes]};
    Barrier* waiting = nullptr;  // the barrier it waits at, if any
    bool done = false;
};
// A warp's lanes exchange 32-bit values through slot arrays: each lane writes its slot, all 32 meet at the
// warp's barrier, then each reads any slot. Successive exchanges alternate between two arrays, so no second
// barrier is needed before a slot is written again: a lane writes the same array two exchanges later, past
// a barrier that every lane reaches only after its read of this one (cta_group_max's reasoning).
struct WarpExchange {
    uint32_t slots[2][32];
    uint8_t parity[32];  // per lane: which array its next exchange uses
};
struct Cta {
    ucontext_t scheduler;
    Fiber fibers[kThreads];  // made once, reused by every CTA of every launch
    Barrier all{0, kThreads};
    Barrier warps[kThreads / 32] = {{0, 32}, {32, 32}, {64, 32}, {96, 32}, {128, 32}, {160, 32}, {192, 32}, {224, 32}};
    WarpExchange exchanges[kThreads / 32];
    const std::function<void()>* body = nullptr;
    int current = 0;
};
inline Cta& cta() {
    static Cta c;
    return c;
}

inline void fiber_main() {
    Cta& c = cta();
    (*c.body)();
    c.fibers[c.current].done = true;  // returns to the scheduler through uc_link
}

// The running fiber waits at `b`; the last one to arrive releases them all. Back to the scheduler either way.
inline void arrive_and_wait(Barrier& b) {
    Cta& c = cta();
    Fiber& me = c.fibers[c.current];
    me.waiting = &b;
    if (++b.arrived == b.count) {
        b.arrived = 0;
        for (int t = b.first; t < b.first + b.count; t++) c.fibers[t].waiting = nullptr;
    }
    swapcontext(&me.context, &c.scheduler);
}

// Runs one CTA: every fiber that is not waiting, in alternating directions, until all have returned.
inline void run_cta() {
    Cta& c = cta();
    for (Fiber& f : c.fibers) {
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.get();
        f.context.uc_stack.ss_size = kStackBytes;
        f.context.uc_link = &c.scheduler;
        makecontext(&f.context, fiber_main, 0);
        f.waiting = nullptr;
        f.done = false;
    }
    std::memset(c.exchanges, 0, sizeof c.exchanges);
    int finished = 0;
    for (bool forward = true; finished < kThreads; forward = !forward) {
        bool ran = false;
        for (int i = 0; i < kThreads; i++) {
            const int t = forward ? i : kThreads - 1 - i;
            Fiber& f = c.fibers[t];
            if (f.done || f.waiting) continue;
            c.current = t;
            threadIdx.x = unsigned(t);
            swapcontext(&c.scheduler, &f.context);
            ran = true;
            finished += f.done;
        }
        if (!ran) {  // every live thread waits at a barrier that some thread will never reach
            std::fprintf(stderr, "cuda_host_shim: block %u deadlocks at a barrier\n", blockIdx.x);
            std::abort();
        }
    }
}
}  // namespace emulation

inline void __syncthreads() { emulation::arrive_and_wait(emulation::cta().all); }

// This lane's value published; returns the 32 lanes' values once every lane has published its own.
inline const uint32_t* warp_exchange_values(uint32_t bits) {
    emulation::WarpExchange& w = emulation::cta().exchanges[threadIdx.x >> 5];
    const unsigned lane = threadIdx.x & 31;
    uint32_t* slots = w.slots[w.parity[lane]];
    w.parity[lane] ^= 1;
    slots[lane] = bits;
    emulation::arrive_and_wait(emulation::cta().warps[threadIdx.x >> 5]);
    return slots;
}

template <class T>
inline T shfl_from(T v, int src_lane) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    const uint32_t* slots = warp_exchange_values(bits);
    T r;
    std::memcpy(&r, &slots[src_lane & 31], 4);
    return r;
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src_lane) { return shfl_from(v, src_lane); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) { return shfl_from(v, int(threadIdx.x & 31) ^ mask); }
// redux.sync.max.s32: one exchange, then the largest of the 32 values.
inline int __reduce_max_sync(unsigned, int v) {
    const uint32_t* slots = warp_exchange_values(uint32_t(v));
    int m = int(slots[0]);
    for (int lane = 1; lane < 32; lane++) m = max(m, int(slots[lane]));
    return m;
}

// Runs `body` as `grid` CTAs of 256 threads, one CTA at a time.
inline void emulate_launch(int grid, const std::function<void()>& body) {
    gridDim.x = unsigned(grid);
    emulation::cta().body = &body;
    for (int b = 0; b < grid; b++) {
        blockIdx.x = unsigned(b);
        emulation::run_cta();
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
