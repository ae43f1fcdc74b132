"""The one place that chooses a backend.

``cpu`` is the pure torch reference in ``bnbcli.formats`` (bit-exact with bitsandbytes' CUDA kernels).
Asking for a backend this machine cannot run is an error with a hint, never a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

from bnbcli.errors import BackendUnavailable, UsageError

BACKENDS = ("auto", "cpu", "cuda")


def resolve_backend(name: str) -> str:
    """The concrete backend for ``name``: "cpu" today ("auto" picks it; "cuda" is not built yet)."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}", hint=f"use one of {', '.join(BACKENDS)}")
    if name == "cuda":
        raise BackendUnavailable(
            "the cuda backend is not available in this version",
            hint="use --backend cpu; it writes the same bytes",
        )
    return "cpu"


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
