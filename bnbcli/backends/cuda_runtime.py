"""Launching the kernels of cuda_kernels/ on torch's streams (compiling them is cuda_modules.py's).

Kernels launch on torch's current stream of the tensors' device, so they are ordered after whatever
torch queued there and before whatever comes next; tensors reach them as device pointers (see
EXCHANGE), never copied.
"""

from __future__ import annotations

import contextlib
import warnings
from functools import cache
from typing import Any

import numpy as np
import torch

from bnbcli.backends.cuda_modules import ELEMENT_NAMES, THREADS, cupy_module, function

ELEMENT_TYPES = dict(zip((torch.float16, torch.bfloat16, torch.float32), ELEMENT_NAMES, strict=True))


@cache
def sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


@cache
def reduce_geometry(device_index: int) -> tuple[int, int]:
    """(multiprocessors, threads per multiprocessor): what torch's reductions size their grids by."""
    props = torch.cuda.get_device_properties(device_index)
    return int(props.multi_processor_count), int(getattr(props, "max_threads_per_multi_processor", 2048))


@cache
def resident_ctas(device_index: int, source: str, name: str) -> int:
    """How many 256-thread CTAs of a kernel fit on one multiprocessor (registers and shared memory)."""
    kernel = function(device_index, source, name)
    try:
        regs = max(1, int(kernel.num_regs))
        smem = int(kernel.shared_size_bytes)
    except Exception:
        return 4  # what __launch_bounds__(256, 4) guarantees
    by_regs = 65536 // (THREADS * (-(-regs // 8) * 8))
    by_smem = (227 * 1024) // (smem + 1024) if smem else 8
    return max(1, min(8, by_regs, by_smem))


NULL = np.uint64(0)  # a null pointer argument

# How tensors reach the kernels. "pointer" (the default): each tensor's device address, passed by
# value. "dlpack": cupy.from_dlpack views (zero-copy too). The kernels only ever see a pointer, and
# either way the launch goes on torch's current stream while the caller holds the tensors, so torch's
# stream-ordered allocator cannot hand their memory out before the kernel has run. Measured on an
# H100 (bench/bench_kernels_cuda.py, 2026-11-24): DLPack costs ~60 us of host time per tensor, enough
# to make a 60 us kernel host-bound, so it is kept only as a fallback.
EXCHANGE = "pointer"

_streams: dict[tuple[int, int], Any] = {}
_stream_keyword = True  # RawKernel forwards stream= to the launch; if not, fall back to `with stream:`


def _cupy_stream(cupy: Any, device_index: int, handle: int) -> Any:
    """CuPy's view of one of torch's streams, made once per stream."""
    stream = _streams.get((device_index, handle))
    if stream is None:
        with warnings.catch_warnings():
            # CuPy 14 prefers Stream.from_external(obj with __cuda_stream__); a raw handle is all we need.
            warnings.simplefilter("ignore", DeprecationWarning)
            stream = _streams[(device_index, handle)] = cupy.cuda.ExternalStream(handle, device_index)
    return stream


def current_stream_handle(device_index: int) -> int:
    """torch's current cudaStream_t for a device, without building a torch.cuda.Stream object (the
    accessor bitsandbytes uses too); the public route where torch lacks it."""
    try:
        return int(torch._C._cuda_getCurrentRawStream(device_index))
    except AttributeError:
        return int(torch.cuda.current_stream(device_index).cuda_stream)


def _argument(cupy: Any, arg: Any) -> Any:
    if not isinstance(arg, torch.Tensor):
        return arg
    if EXCHANGE == "pointer":
        return np.uint64(arg.data_ptr())
    # CuPy has no bfloat16: 16-bit floats travel as int16 views (the kernels read raw bits anyway).
    return cupy.from_dlpack(arg.view(torch.int16) if arg.dtype in (torch.float16, torch.bfloat16) else arg)


def launch(device: torch.device, source: str, name: str, grid: int, args: tuple[Any, ...]) -> None:
    """Launch ``name`` with ``grid`` CTAs of 256 threads on torch's current stream of ``device``.

    ``args`` holds torch tensors (passed as device pointers) and numpy scalars (passed by value, so
    their dtype must be the parameter's: np.int32, np.int64, np.float32, np.uint64 NULL).
    """
    global _stream_keyword
    if grid <= 0:
        return
    cupy = cupy_module()
    kernel = function(device.index, source, name)
    stream = _cupy_stream(cupy, device.index, current_stream_handle(device.index))
    device_context = (
        contextlib.nullcontext() if torch.cuda.current_device() == device.index else cupy.cuda.Device(device.index)
    )
    with device_context:
        if EXCHANGE == "dlpack" or not _stream_keyword:
            with stream:  # DLPack's handshake reads CuPy's current stream
                kernel((grid,), (THREADS,), tuple(_argument(cupy, a) for a in args))
            return
        try:
            kernel((grid,), (THREADS,), tuple(_argument(cupy, a) for a in args), stream=stream)
        except TypeError:  # a CuPy whose RawKernel takes no stream=: launch (once more) the other way
            _stream_keyword = False
            with stream:
                kernel((grid,), (THREADS,), tuple(_argument(cupy, a) for a in args))
