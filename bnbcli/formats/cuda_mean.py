"""Bit-exact CPU emulation of ``torch.mean(x)`` for a 1-D float32 CUDA tensor.

Why: bitsandbytes' double quantization stores ``offset = absmax.mean()`` (the
"nested_offset"), computed on the GPU in float32.  A float64 mean rounded to
float32 disagrees with it in the last bit for roughly 1 case in 10, so we
replay torch's CUDA reduction kernel exactly, in the same float32 order.

Provenance.  ``Reduce.cuh`` and ``SharedReduceOps.h`` were read from the
headers shipped in the torch 2.11.0+cu130 wheel (identical in the parts used
here to torch 2.13's); ``ReduceMomentKernel.cu`` and ``ReduceOps.cpp`` from
upstream pytorch sources.  On an H100 the torch 2.11 profiler names the kernel
``reduce_kernel<512, 1, ReduceOp<float, MeanOps<float, float, float, float>,
unsigned int, float, 4, 4>>`` for every length (no vt0 = 8 variant for float).

* ``aten/src/ATen/native/ReduceOps.cpp`` ``mean_out``: on a non-CPU device it
  builds a reduction TensorIterator and calls ``mean_stub`` directly (the
  sum-then-``div_`` path is CPU only).
* ``aten/src/ATen/native/cuda/ReduceMomentKernel.cu`` ``mean_kernel_impl``:
  ``factor = float(num_outputs) / numel`` (a float32 ``1.0f / float(N)``,
  computed on the host) and ``gpu_reduce_kernel<float, float>`` with
  ``MeanOps`` and the default ``vt0 = 4``, ``input_vec_size = 4``.
* ``aten/src/ATen/native/SharedReduceOps.h`` ``MeanOps``: ``reduce`` and
  ``combine`` are plain float32 ``a + b``; ``project(a)`` is ``a * factor``
  (a float32 multiply by the reciprocal, not a division by N).
* ``aten/src/ATen/native/cuda/Reduce.cuh``: ``setReduceConfig``,
  ``ReduceConfig::set_block_dimension``, ``ReduceOp::run``,
  ``input_vectorized_thread_reduce_impl``, ``thread_reduce_impl``,
  ``block_x_reduce``, ``block_y_reduce`` and ``global_reduce``.

Validated bit for bit against torch 2.11 ``torch.mean`` on an H100 (132 SMs)
for 593 vectors of 328 lengths from 1 to ~21 million
(``bench/device_check_cuda_mean.py``) and against the 276 GPU
``nested_offset`` values of the golden bitsandbytes cases.

Assumptions:

* The tensor is contiguous and starts at an address aligned to 16 bytes
  (torch's caching allocator hands out blocks aligned to at least 256
  bytes), so the unaligned "head" of ``input_vectorized_thread_reduce_impl``
  is empty.
* The launch configuration depends on the GPU: ``sm_count``
  (``multiProcessorCount``; H100 SXM = 132) and ``max_threads_per_sm``
  (``maxThreadsPerMultiProcessor``; 2048 on every recent NVIDIA GPU).  Warp
  size 32.  The reduction is split over several CTAs for N > 130560, but
  the CTA count only depends on the GPU once it reaches the cap
  ``sm_count * max_threads_per_sm / 512``, i.e. for
  N > 512 * 16 * sm_count * max_threads_per_sm / 512 (4325376 on an H100).
* N < 2**31 (torch would otherwise split the iterator for 32-bit indexing).
* Float32 adds and the final multiply are IEEE round-to-nearest-even without
  FMA contraction and without flush-to-zero (torch builds without
  ``--use_fast_math``); numpy float32 arithmetic does the same.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cuda_mean_f32", "reduce_config"]

WARP_SIZE = 32
MAX_NUM_THREADS = 512  # mnt_wrapper<float>::MAX_NUM_THREADS
VT0 = 4  # gpu_reduce_kernel default unroll (number of accumulators)
INPUT_VEC_SIZE = 4  # gpu_reduce_kernel default input_vec_size (= vt0)
MIN_VALUES_PER_THREAD = 16  # setReduceConfig (CUDA, not ROCm)
MAX_VALUES_PER_THREAD = 256


def _div_up(a: int, b: int) -> int:
    return (a + b - 1) // b


def _last_pow2(n: int) -> int:
    """Reduce.cuh ``last_pow2``: largest power of two <= n (at least 1)."""
    return max(1, 1 << (int(n).bit_length() - 1)) if n > 0 else 1


def reduce_config(n: int, sm_count: int = 132, max_threads_per_sm: int = 2048) -> dict:
    """Mirror ``setReduceConfig`` for a full reduction of a contiguous 1-D
    float32 tensor of ``n`` elements (one output, ``inputs_per_output = n``).

    Returns block_width (threads of the one-row CTA), ctas (= ctas_per_output,
    blockIdx.y extent), whether the input is loaded as float4 vectors, and
    which of block_y / global reductions are active.
    """
    num_inputs = n
    # reduction_on_fastest_striding_dimension: dim0 = inputs_per_output,
    # dim1 = num_outputs = 1; the element stride is sizeof(float), so the
    # "vectorize along input" case applies when dim0 >= 128.
    dim0, dim1 = n, 1
    vectorize = n >= 128
    if vectorize:
        dim0 //= INPUT_VEC_SIZE
    # ReduceConfig::set_block_dimension<float>(dim0, dim1), output_vec_size 1
    dim0_pow2 = _last_pow2(dim0) if dim0 < MAX_NUM_THREADS else MAX_NUM_THREADS
    dim1_pow2 = _last_pow2(dim1) if dim1 < MAX_NUM_THREADS else MAX_NUM_THREADS
    block_width = min(dim0_pow2, WARP_SIZE)
    block_height = min(dim1_pow2, MAX_NUM_THREADS // block_width)
    block_width = min(dim0_pow2, MAX_NUM_THREADS // block_height)
    num_threads = block_width * block_height
    assert block_height == 1

    # input_mult[0] = split_input(block_width): lanes split the input.
    step_input = block_width
    values_per_thread = _div_up(num_inputs, step_input)
    # split_across_warps: input_mult[1] = split_input(block_height) (=1 here,
    # so it only switches block_y_reduce on, which is a no-op for one row).
    warp_split_threshold = min(block_height * 16, MAX_VALUES_PER_THREAD)
    split_across_warps = values_per_thread >= warp_split_threshold
    # Split across CTAs (global_reduce) when each thread has >= 256 values.
    blocks_per_sm = max_threads_per_sm // num_threads
    target_grid_size = sm_count * blocks_per_sm
    grid_x = 1  # div_up(num_outputs / output_vec_size, step_output)
    ctas = 1
    if split_across_warps and values_per_thread >= MAX_VALUES_PER_THREAD and grid_x <= target_grid_size:
        c1 = _div_up(target_grid_size, grid_x)
        c2 = _div_up(values_per_thread, MIN_VALUES_PER_THREAD)
        c3 = _div_up(values_per_thread, MAX_VALUES_PER_THREAD)
        ctas = max(min(c1, c2), c3)
    return {
        "block_width": block_width,
        "ctas": ctas,
        "vectorize_input": vectorize,
        "block_y_reduce": split_across_warps,
        "global_reduce": ctas > 1,
    }


def _seq_sum_rows(blocks: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0 (one thread's serial loop),
    starting from the identity 0.0f as torch's accumulators do."""
    acc = np.zeros(blocks.shape[1:], dtype=np.float32)
    for k in range(blocks.shape[0]):
        acc += blocks[k]
    return acc


def _vectorized_thread_reduce(x: np.ndarray, nthreads: int, vec: int) -> np.ndarray:
    """ReduceOp::input_vectorized_thread_reduce_impl for every thread.

    Global thread g = blockIdx.y * block_width + threadIdx.x (= input_idx())
    reads float4 vectors g, g + T, g + 2T, ... (T = block_width * ctas =
    step_input); lane i of each vector goes to accumulator value_list[i].
    The n % 4 tail elements are added to value_list[0] of threads 0.. of CTA 0
    (should_reduce_tail), then value_list[0] += value_list[1], += [2], += [3].
    """
    n = x.size
    nvec = n // vec
    full = nvec // nthreads  # loop iterations every thread makes
    rem = nvec - full * nthreads  # threads 0..rem-1 make one more
    acc = _seq_sum_rows(x[: full * nthreads * vec].reshape(full, nthreads, vec))
    if rem:
        acc[:rem] += x[full * nthreads * vec : nvec * vec].reshape(rem, vec)
    tail = n - nvec * vec
    if tail:
        acc[:tail, 0] += x[nvec * vec :]
    out = acc[:, 0].copy()
    for i in range(1, vec):  # combine accumulators in order 1..vec-1
        out += acc[:, i]
    return out


def _strided_thread_reduce(x: np.ndarray, nthreads: int, vt0: int) -> np.ndarray:
    """ReduceOp::thread_reduce_impl (contiguous, output_vec_size 1).

    Thread g reads x[g], x[g+T], x[g+2T], ...; its j-th element goes to
    accumulator value_list[j % vt0] (the unrolled main loop and the tail loop
    both restart at accumulator 0), then the accumulators are combined
    value_list[0] += value_list[1], += [2], ...
    """
    n = x.size
    per = _div_up(n, nthreads)  # elements of the busiest thread
    groups = _div_up(per, vt0)
    padded = np.zeros(groups * vt0 * nthreads, dtype=np.float32)
    padded[:n] = x  # zeros beyond n are exact no-ops (x + 0.0f == x)
    acc = _seq_sum_rows(padded.reshape(groups, vt0, nthreads))  # (vt0, T)
    out = acc[0].copy()
    for i in range(1, vt0):
        out += acc[i]
    return out


def _block_x_reduce(v: np.ndarray) -> np.ndarray:
    """ReduceOp::block_x_reduce over the last axis (blockDim.x lanes).

    Shared-memory halving for offsets blockDim.x/2 .. 32, then
    __shfl_down_sync with offsets 16, 8, 4, 2, 1 (CUDA builds use decreasing
    offsets).  Both steps are ``lane[x] += lane[x + offset]``, so lane 0 ends
    with the same pairwise tree either way.
    """
    width = v.shape[-1]
    while width > 1:
        width //= 2
        v = v[..., :width] + v[..., width : 2 * width]
    return v[..., 0]


def cuda_mean_f32(x: np.ndarray, sm_count: int = 132, max_threads_per_sm: int = 2048) -> np.float32:
    """float32 result of ``torch.mean(x)`` on a CUDA GPU (torch 2.11) for a
    contiguous 1-D float32 tensor ``x`` (N >= 1), bit for bit.

    ``sm_count`` / ``max_threads_per_sm`` are the device's
    ``multiProcessorCount`` / ``maxThreadsPerMultiProcessor`` (H100: 132 / 2048).
    """
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = int(x.size)
    if n < 1:
        raise ValueError("cuda_mean_f32 needs at least one element (torch returns NaN)")
    cfg = reduce_config(n, sm_count, max_threads_per_sm)
    bw, ctas = cfg["block_width"], cfg["ctas"]
    nthreads = bw * ctas

    with np.errstate(over="ignore", invalid="ignore"):
        # ReduceOp::thread_reduce: one float32 partial per thread.
        if cfg["vectorize_input"]:
            per_thread = _vectorized_thread_reduce(x, nthreads, INPUT_VEC_SIZE)
        else:
            per_thread = _strided_thread_reduce(x, nthreads, VT0)
        # block_x_reduce inside each CTA (block_y_reduce is a no-op: one row).
        per_cta = _block_x_reduce(per_thread.reshape(ctas, bw))
        if cfg["global_reduce"]:
            # global_reduce, in the last CTA to finish: lane x serially adds
            # the staged CTA results x, x + bw, x + 2bw, ... onto 0.0f, then
            # block_x_reduce once more.
            rows = _div_up(ctas, bw)
            staged = np.zeros(rows * bw, dtype=np.float32)
            staged[:ctas] = per_cta
            total = _block_x_reduce(_seq_sum_rows(staged.reshape(rows, bw)))
        else:
            total = per_cta[0]
        # MeanOps::project: acc * factor, factor = (float)1 / (float)N.
        factor = np.float32(1.0) / np.float32(n)
        return np.float32(np.float32(total) * factor)
