"""What `bnb env` reports: versions of bnbcli and its engines, and the GPUs this process can see.

Without NVIDIA's driver there is no GPU to see: the versions then come from the installed packages'
metadata, without importing torch or CuPy (seconds on a small machine), and nothing else changes."""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from bnbcli import __version__
from bnbcli.backends import CudaStatus, cuda_status, cuda_unavailable
from bnbcli.plan.planners import cache_folder


@dataclass(frozen=True)
class Environment:
    bnbcli: str
    python: str
    platform: str
    torch: str
    numpy: str
    safetensors: str | None
    cupy: str | None
    cuda_runtime: str | None
    torch_cuda: str | None
    gpus: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    planners: dict[str, str | None] = field(default_factory=dict)  # the model-aware planners' libraries
    plan_cache: dict[str, object] = field(default_factory=dict)  # planning/cache.py: folder, enabled, plans
    # CPUs this process may use, OMP_NUM_THREADS, and how OpenMP threads wait (`bnb` sets PASSIVE: cli/entry.py)
    cpu_threads: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def nvidia_driver_present() -> bool:
    """NVIDIA's kernel driver or its library is here: only then can torch or CuPy see a GPU."""
    if Path("/proc/driver/nvidia").exists():
        return True
    return any(ctypes.util.find_library(name) for name in ("cuda", "nvcuda"))


def _torch_cuda_version() -> str | None:
    """torch.version.cuda, read from torch/version.py (a plain assignment) without importing torch."""
    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.split(":")[0].strip() == "cuda":
                value = value.strip().strip("'\"")
                return None if value == "None" else value
    return None


def _cupy_without_import() -> CudaStatus:
    if importlib.util.find_spec("cupy") is None:
        return CudaStatus(None, None)
    dists = metadata.packages_distributions().get("cupy", [])
    return CudaStatus(installed_version(dists[0]) if dists else None, None)


def describe_environment() -> Environment:
    if not nvidia_driver_present():
        return _describe(
            installed_version("torch") or "not installed", _torch_cuda_version(), _cupy_without_import(), []
        )
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return _describe(torch.__version__, torch.version.cuda, cuda_status(), gpus)


def _cpu_threads() -> dict[str, object]:
    """The CPUs this process may run on, the OpenMP settings torch's threads follow (torch is not imported
    for this: without a GPU `bnb env` answers at once)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": cpus,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _describe(torch_version: str, torch_cuda: str | None, cuda: CudaStatus, gpus: list[str]) -> Environment:
    return Environment(
        bnbcli=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch_version,
        numpy=installed_version("numpy") or "not installed",
        safetensors=installed_version("safetensors"),
        cupy=cuda.cupy_version,
        cuda_runtime=cuda.runtime_version,
        torch_cuda=torch_cuda,
        gpus=gpus,
        backends=["cpu"] if not gpus or cuda_unavailable() else ["cpu", "cuda"],
        planners={library: installed_version(library) for library in ("transformers", "diffusers")},
        plan_cache=cache_folder.status(),
        cpu_threads=_cpu_threads(),
    )
