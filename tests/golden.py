"""Access to the golden vectors (``BNB_GOLDEN_DIR`` or ../shared/golden) and byte comparisons."""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("BNB_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


@lru_cache(maxsize=1)
def kernel_cases() -> dict:
    return json.loads((golden_dir() / "kernels" / "cases.json").read_text())


@lru_cache(maxsize=1)
def kernel_inputs() -> dict[str, torch.Tensor]:
    return load_file(golden_dir() / "kernels" / "inputs.safetensors")


@lru_cache(maxsize=1)
def kernel_outputs() -> dict[str, torch.Tensor]:
    return load_file(golden_dir() / "kernels" / "outputs.safetensors")


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sha256_of(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def assert_same_tensor(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same dtype, same shape, same bytes; on failure say how many elements differ and where first."""
    assert ours.dtype == expected.dtype, f"{what}: dtype {ours.dtype} != {expected.dtype}"
    assert tuple(ours.shape) == tuple(expected.shape), f"{what}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    if tensor_bytes(ours) == tensor_bytes(expected):
        return
    a = ours.contiguous().reshape(-1)
    b = expected.contiguous().reshape(-1)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = torch.nonzero(a.view(width) != b.view(width)).reshape(-1)
    i = int(diff[0])
    raise AssertionError(f"{what}: {diff.numel()} of {a.numel()} elements differ; first at {i}: {a[i]} != {b[i]}")
