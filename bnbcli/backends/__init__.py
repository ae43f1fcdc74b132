"""The one place that chooses a backend.

``cpu`` is the pure torch reference in ``bnbcli.formats`` (bit-exact with bitsandbytes' CUDA kernels);
``cuda`` runs the kernels of cuda_kernels/ through CuPy (``bnbcli.backends.cuda``) and writes the same
bytes. ``auto`` is cuda when CuPy, a CUDA build of torch and GPUs of compute capability 8.0 or newer
are all here, else cpu. Asking for
``cuda`` where it cannot run is an error with a hint, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from typing import Literal, get_args

from bnbcli.errors import BackendUnavailable, UsageError

BackendName = Literal["auto", "cpu", "cuda"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
MIN_CAPABILITY = (8, 0)  # Ampere: the kernels use its bf16 conversion instructions


@cache
def cuda_unavailable() -> tuple[str, str] | None:
    """Why the cuda backend cannot run here (message, hint), or None when it can. Checked once."""
    if importlib.util.find_spec("cupy") is None:
        return (
            "the cuda backend needs CuPy, which is not installed",
            "pip install 'bnbcli[cuda]' (CuPy for CUDA 13), or use --backend cpu: it writes the same bytes",
        )
    import torch

    if torch.version.cuda is None:
        return (
            f"the cuda backend needs a CUDA build of torch; this one is {torch.__version__}",
            "install torch with CUDA support, or use --backend cpu: it writes the same bytes",
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return (
            "the cuda backend found no GPU",
            "check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --backend cpu: it writes the same bytes",
        )
    old = [i for i in range(torch.cuda.device_count()) if torch.cuda.get_device_capability(i) < MIN_CAPABILITY]
    if old:
        major, minor = torch.cuda.get_device_capability(old[0])
        return (
            f"the cuda backend's kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer "
            f"(bf16 conversion instructions); GPU {old[0]} ({torch.cuda.get_device_name(old[0])}) "
            f"is {major}.{minor}",
            "use --backend cpu: it writes the same bytes (or hide that GPU with CUDA_VISIBLE_DEVICES)",
        )
    from bnbcli.backends.cuda_runtime import SOURCES, kernel_dir

    missing = [name for name in SOURCES if not (kernel_dir() / name).is_file()]
    if missing:
        return (
            f"the cuda backend's kernel sources are missing from {kernel_dir()} ({', '.join(missing)})",
            "reinstall bnbcli (the wheel ships them) or set BNB_CUDA_KERNELS to a cuda_kernels/ folder; "
            "or use --backend cpu",
        )
    try:
        import cupy  # noqa: F401  (the import alone can fail: a CuPy built for another CUDA)
    except Exception as exc:
        return (
            f"the cuda backend cannot import CuPy: {type(exc).__name__}: {exc}".splitlines()[0],
            "install the CuPy wheel for torch's CUDA (cupy-cuda13x), or use --backend cpu",
        )
    return None


def resolve_backend(name: str) -> str:
    """The concrete backend for ``name``: "cpu" or "cuda"."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}", hint=f"use one of {', '.join(BACKENDS)}")
    if name == "cpu":
        return "cpu"
    problem = cuda_unavailable()
    if name == "cuda" and problem is not None:
        raise BackendUnavailable(*problem)
    return "cpu" if problem is not None else "cuda"


@dataclass(frozen=True)
class CudaStatus:
    cupy_version: str | None
    runtime_version: str | None


def cuda_status() -> CudaStatus:
    """CuPy and the CUDA runtime it sees, or None where absent (never raises)."""
    try:
        import cupy  # the only place outside the CUDA backend that may touch CuPy
    except Exception:
        return CudaStatus(None, None)
    try:
        runtime = cupy.cuda.runtime.runtimeGetVersion()
        version = f"{runtime // 1000}.{runtime % 1000 // 10}"
    except Exception:
        version = None
    return CudaStatus(cupy.__version__, version)
