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


def test_gpus_older_than_ampere_are_refused_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A T4 (compute capability 7.5) has CuPy and a CUDA torch but not the kernels' instructions:
    `auto` takes the CPU, `cuda` says why."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "cupy" else find_spec(name))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla T4")
    cuda_unavailable.cache_clear()
    try:
        assert resolve_backend("auto") == "cpu"
        with pytest.raises(BackendUnavailable, match=r"8\.0 or newer.*GPU 0 \(Tesla T4\) is 7\.5") as info:
            resolve_backend("cuda")
        assert info.value.hint and "--backend cpu" in info.value.hint
    finally:
        cuda_unavailable.cache_clear()


def test_cuda_module_imports_without_cupy() -> None:
    """DESIGN rule 7: CuPy is imported inside the backend's functions only."""
    code = "import sys, bnbcli.backends.cuda; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
