"""Compiling the kernels of cuda_kernels/ through CuPy (NVRTC), with neither torch nor numpy imported.

Each source file becomes one ``cupy.RawModule``, compiled once per device and kept for the life of the
process; CuPy also caches the binary on disk, keyed by the source and the options, which include a digest
of every file in cuda_kernels/ (so an edit to the shared header recompiles everything). CuPy is imported
inside functions only (DESIGN rule 7): importing this module on a machine without CuPy is fine.

Nothing here needs torch, so `bnb quantize` can start the warm-up (CUDA's context, the modules) while
torch is still being imported (``warm_up_early``); launching is cuda_runtime.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from functools import cache
from pathlib import Path
from typing import Any

from bnbcli.errors import BackendUnavailable

THREADS = 256  # BNB_THREADS in bnb_common.cuh: every kernel runs 256-thread CTAs

# Kernel instantiations per source file, as NVRTC name expressions (also what
# tests/unit/test_cuda_sources.py instantiates when it compiles the files with nvcc).
ELEMENT_NAMES = ("F16", "BF16", "F32")  # torch.float16, torch.bfloat16, torch.float32
SOURCES: dict[str, tuple[str, ...]] = {
    "quantize_blockwise.cu": (
        *(f"kQuantizeBlockwise<{t}, {e}>" for t in ELEMENT_NAMES for e in ("Nf4", "Fp4", "Dyn8")),
        "kQuantizeBlockwise<F32, Dyn8L1>",  # the second level of double quantization
        "kTorchMeanPartials",
    ),
    "dequantize_blockwise.cu": tuple(f"kDequantize{b}bit<{t}>" for b in (4, 8) for t in ELEMENT_NAMES),
    "int8_rowwise.cu": (*(f"kInt8RowQuant<{t}>" for t in ELEMENT_NAMES), "kInt8RowDequant"),
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


def warm_up(device_indices: tuple[int, ...]) -> tuple[threading.Thread, ...]:
    """Make CUDA's context and load every module on each device (the current one, 0, when none are named)
    on threads of their own, started now. `bnb quantize` calls this before it imports torch: the context
    (~0.3 s on an H100) and NVRTC (seconds, the first time) release the GIL, so they overlap that import;
    torch then finds the primary context made. A failure is left for the first launch to report. Not
    daemon threads: none must be in NVRTC when the interpreter exits."""

    def compile_all(device_index: int) -> None:
        with contextlib.suppress(Exception):
            for source, names in SOURCES.items():
                function(device_index, source, names[0])

    threads = tuple(
        threading.Thread(target=compile_all, args=(index,), name=f"bnb-cuda-warm-up-{index}")
        for index in device_indices or (0,)
    )
    for thread in threads:
        thread.start()
    return threads
