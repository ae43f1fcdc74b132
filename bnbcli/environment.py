"""What `bnb env` reports: versions of bnbcli and its engines, and the GPUs this process can see."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata

import numpy as np
import torch

from bnbcli import __version__
from bnbcli.backends import cuda_status, cuda_unavailable
from bnbcli.plan.planners import cache as plan_cache


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
    # torch's intra-op threads, and how OpenMP threads wait (the `bnb` command sets PASSIVE: bnbcli/cli/entry.py)
    cpu_threads: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe_environment() -> Environment:
    cuda = cuda_status()
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return Environment(
        bnbcli=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        numpy=np.__version__,
        safetensors=_installed("safetensors"),
        cupy=cuda.cupy_version,
        cuda_runtime=cuda.runtime_version,
        torch_cuda=torch.version.cuda,
        gpus=gpus,
        backends=["cpu"] if cuda_unavailable() else ["cpu", "cuda"],
        planners={library: _installed(library) for library in ("transformers", "diffusers")},
        plan_cache=plan_cache.status(),
        cpu_threads={"torch": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
    )
