"""Compiling and launching the kernels of cuda_kernels/ through CuPy, on torch's streams.

CuPy is imported here only, inside functions (DESIGN rule 7): importing this module on a machine
without CuPy is fine. Each source file becomes one ``cupy.RawModule``
(NVRTC), compiled once per device and kept for the life of the process; CuPy also caches the binary
on disk, keyed by the source and the options, which include a digest of every file in cuda_kernels/
(so an edit to the shared header recompiles everything).

Kernels launch on torch's current stream of the tensors' device, so they are ordered after whatever
torch queued there and before whatever comes next; tensors reach them as device pointers (see
EXCHANGE), never copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnbcli.errors import BackendUnavailable

THREADS = 256  # BNB_THREADS in bnb_common.cuh: every kernel runs 256-thread CTAs

# Kernel instantiations per source file, as NVRTC name expressions (also what
# tests/unit/test_cuda_sources.py instantiates when it compiles the files with nvcc).
ELEMENT_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
SOURCES: dict[str, tuple[str, ...]] = {
    "quantize_blockwise.cu": (
        *(f"kQuantizeBlockwise<{t}, {e}>" for t in ELEMENT_TYPES.values() for e in ("Nf4", "Fp4", "Dyn8")),
        "kQuantizeBlockwise<F32, Dyn8L1>",  # the second level of double quantization
        "kTorchMeanPartials",
    ),
    "dequantize_blockwise.cu": tuple(f"kDequantize{b}bit<{t}>" for b in (4, 8) for t in ELEMENT_TYPES.values()),
    "int8_rowwise.cu": (*(f"kInt8RowQuant<{t}>" for t in ELEMENT_TYPES.values()), "kInt8RowDequant"),
}
# NVRTC options. No --use_fast_math: the kernels spell every rounding-sensitive operation as PTX, and
# --fmad=false keeps the compiler from fusing anything else.
OPTIONS = ("-std=c++17", "--fmad=false")


def kernel_dir() -> Path:
    """Where the kernel sources are: $BNB_CUDA_KERNELS, else cuda_kernels/ of this source checkout,
    else the copy a wheel installs as the package bnbcli.cuda_kernels."""
    env = os.environ.get("BNB_CUDA_KERNELS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "cuda_kernels"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parents[1] / "cuda_kernels"


@cache
def _sources_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(kernel_dir().glob("*.cu*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cupy_module() -> Any:
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy that finds no CUDA runtime
        raise BackendUnavailable(
            f"the cuda backend needs CuPy, which cannot be imported ({type(exc).__name__})",
            hint="pip install 'bnbcli[cuda]' (CuPy for CUDA 13), or use --backend cpu: it writes the same bytes",
        ) from exc
    return cupy


_lock = threading.Lock()
_modules: dict[tuple[int, str], Any] = {}
_functions: dict[tuple[int, str], Any] = {}


def _compile(device_index: int, source: str) -> Any:
    cupy = cupy_module()
    path = kernel_dir() / source
    if not path.is_file():
        raise BackendUnavailable(
            f"the cuda backend's kernel source {path} is missing",
            hint="reinstall bnbcli (the wheel ships them) or set BNB_CUDA_KERNELS; or use --backend cpu",
        )
    options = (*OPTIONS, f"-I{kernel_dir()}", f"-DBNBCLI_KERNELS_DIGEST={_sources_digest()}")
    try:
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=path.read_text(), options=options, name_expressions=SOURCES[source])
            module.compile()  # now, so that a failure is reported here and not at the first launch
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailable(
            f"the cuda backend could not compile cuda_kernels/{source} for GPU {device_index}: {first_line}",
            hint="use --backend cpu (same bytes); please report this with the output of `bnb env`",
        ) from exc
    return module


def function(device_index: int, source: str, name: str) -> Any:
    """The compiled kernel ``name`` of ``source`` for a device (compiling its module on first use)."""
    key = (device_index, name)
    kernel = _functions.get(key)
    if kernel is None:
        with _lock:
            if (device_index, source) not in _modules:
                _modules[(device_index, source)] = _compile(device_index, source)
            kernel = _functions[key] = _modules[(device_index, source)].get_function(name)
    return kernel


def warm_up(device_index: int) -> threading.Thread:
    """Compile every module for a device on a thread of its own, started now: NVRTC takes seconds and
    releases the GIL, so this overlaps work that needs no kernel yet (planning imports transformers).
    A failure is left for the first launch to report. Not a daemon thread: it must not be in NVRTC
    when the interpreter exits."""

    def compile_all() -> None:
        with contextlib.suppress(Exception):
            for source, names in SOURCES.items():
                function(device_index, source, names[0])

    thread = threading.Thread(target=compile_all, name="bnb-cuda-warm-up")
    thread.start()
    return thread


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
