"""The CUDA backend without a GPU: every kernel source compiles, and choosing the backend is loud.

nvcc (when it is installed) builds each cuda_kernels/*.cu for sm_90 with every instantiation the
backend asks NVRTC for, so a syntax or template error shows up here and not on the GPU machine.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bnbcli
from bnbcli.backends import cuda_unavailable, resolve_backend
from bnbcli.backends.cuda_runtime import SOURCES, kernel_dir
from bnbcli.errors import BackendUnavailable

NVCC = shutil.which("nvcc")


def test_every_source_is_listed() -> None:
    assert sorted(p.name for p in kernel_dir().glob("*.cu")) == sorted(SOURCES)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_source_compiles_for_sm90(source: str, tmp_path: Path) -> None:
    """Every instantiation, as NVRTC's name expressions produce them (taking the address instantiates),
    to PTX and through ptxas; no stack frame means no local-memory spills."""
    unit = tmp_path / "unit.cu"
    addresses = ", ".join(f"(void*)&{name}" for name in SOURCES[source])
    unit.write_text(f'#include "{source}"\n__device__ void* bnbcli_instances[] = {{{addresses}}};\n')
    assert NVCC is not None
    command = [NVCC, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", "--fmad=false", f"-I{kernel_dir()}"]
    done = subprocess.run([*command, str(unit), "-o", str(tmp_path / "unit.cubin")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-4000:]
    frames = [line for line in done.stderr.splitlines() if "stack frame" in line]
    assert frames and all(line.strip().startswith("0 bytes stack frame, 0 bytes spill") for line in frames), frames


def test_cuda_backend_refuses_loudly_without_its_requirements() -> None:
    problem = cuda_unavailable()
    if problem is None:
        pytest.skip("the cuda backend can run here")
    assert resolve_backend("auto") == "cpu"
    with pytest.raises(BackendUnavailable, match="cuda") as info:
        resolve_backend("cuda")
    assert info.value.hint and "--backend cpu" in info.value.hint
    with pytest.raises(BackendUnavailable):
        bnbcli.quantize_4bit(torch.randn(64), backend="cuda")


def test_cuda_module_imports_without_cupy() -> None:
    """DESIGN rule 7: CuPy is imported inside the backend's functions only."""
    code = "import sys, bnbcli.backends.cuda; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
