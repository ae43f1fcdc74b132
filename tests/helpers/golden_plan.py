"""The golden models as the planner sees them: each source's config.json and its tensors' shapes and dtypes
(read from the safetensors header alone), and each golden variant's BitsAndBytesConfig as a QuantScheme."""

from __future__ import annotations

import json
import struct
from functools import cache
from pathlib import Path

import torch

from bnbcli.formats.dtypes import DType
from bnbcli.plan.scheme import QuantScheme

from helpers.golden import SAFETENSORS_DTYPES, golden_dir

# The BitsAndBytesConfig each golden variant was written with (golden/README.md), as a QuantScheme.
VARIANTS: dict[str, QuantScheme] = {
    "nf4-dq": QuantScheme(method="nf4", double_quant=True, compute_dtype=torch.bfloat16),
    "nf4": QuantScheme(method="nf4", compute_dtype=torch.bfloat16),
    "fp4-dq": QuantScheme(method="fp4", double_quant=True, compute_dtype=torch.float32),
    "nf4-storage-bf16": QuantScheme(method="nf4", quant_storage=torch.bfloat16),
    "int8": QuantScheme(method="int8"),
    "int8-skip-down": QuantScheme(method="int8", skip=("down_proj", "fc2", "c_proj")),
}


def header(path: Path) -> dict:
    """A safetensors file's header, without its __metadata__."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        found = json.loads(f.read(length))
    found.pop("__metadata__", None)
    return found


def checkpoint_file(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


@cache
def source(family: str) -> tuple[dict, dict[str, tuple[tuple[int, ...], DType]]]:
    """(config.json, name → (shape, dtype)) of golden/models/<family>/src: what plan_quantization takes."""
    src = golden_dir() / "models" / family / "src"
    tensors = {
        k: (tuple(v["shape"]), DType.of(SAFETENSORS_DTYPES[v["dtype"]]))
        for k, v in header(checkpoint_file(src)).items()
    }
    return json.loads((src / "config.json").read_text()), tensors
