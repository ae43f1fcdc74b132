"""`bnb quantize --backend cuda` writes the files `--backend cpu` writes, byte for byte (GPU machine only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.bnb_inprocess import quantize
from helpers.golden import VARIANT_FLAGS, golden_dir, golden_variants

pytestmark = pytest.mark.gpu

MANIFEST = "bnb_manifest.json"


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest_tensors(raw: bytes) -> list:
    """The manifest's tensors without the round-trip error, whose float64 sums run in another order on the GPU."""
    components = json.loads(raw)["components"]
    return [[{k: v for k, v in t.items() if k != "error"} for t in component["tensors"]] for component in components]


@pytest.mark.parametrize(("family", "variant"), golden_variants(), ids=lambda v: v)
def test_cuda_backend_writes_the_cpu_files(family: str, variant: str, tmp_path: Path) -> None:
    src = golden_dir() / "models" / family / "src"
    quantize(src, tmp_path / "cpu", *VARIANT_FLAGS[variant], "--backend", "cpu")
    quantize(src, tmp_path / "cuda", *VARIANT_FLAGS[variant], "--backend", "cuda")
    cpu, cuda = files(tmp_path / "cpu"), files(tmp_path / "cuda")
    assert sorted(cpu) == sorted(cuda)
    for name in cpu:
        if name.endswith(MANIFEST):
            assert manifest_tensors(cpu[name]) == manifest_tensors(cuda[name]), name
        else:
            assert cpu[name] == cuda[name], f"{name} differs between --backend cpu and --backend cuda"


def test_two_gpus_write_the_one_gpu_files(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    src = golden_dir() / "models" / "llama" / "src"
    quantize(src, tmp_path / "one", *VARIANT_FLAGS["nf4-dq"], "--backend", "cuda", "--device", "cuda:0")
    quantize(src, tmp_path / "two", *VARIANT_FLAGS["nf4-dq"], "--backend", "cuda", "--devices", "0,1")
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name in one:
        if not name.endswith(MANIFEST):
            assert one[name] == two[name], name
