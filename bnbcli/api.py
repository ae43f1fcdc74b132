"""The public Python API: every format with a ``backend`` argument, as ``bnbcli`` exports it.

``backend="cuda"`` runs the kernels of cuda_kernels/ and returns the bytes ``backend="cpu"`` returns.
Device contract: tensors on a GPU are quantized there and the results stay on that GPU; CPU tensors
are copied to the current GPU, and every tensor of the result is copied back to the CPU, so the
result always lives where the input did. ``backend="auto"`` is cuda when it can run, else cpu.
Which function runs a format on a backend is ``bnbcli.formats.registry``'s to say.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from bnbcli.backends import resolve_backend
from bnbcli.formats.blockwise8 import Blockwise8Quantized
from bnbcli.formats.fourbit import QuantState4bit
from bnbcli.formats.int8 import Int8Rowwise
from bnbcli.formats.layout import FormatSettings
from bnbcli.formats.registry import family_of, family_of_record, kernels


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an argument: itself, or a record's tensor fields."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        return [v for f in dataclasses.fields(value) if isinstance(v := getattr(value, f.name), torch.Tensor)]
    return []


def _to(value: Any, device: torch.device) -> Any:
    """A tensor, or a record with every tensor field, on ``device`` (no copy for those already there)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: v.to(device)
            for f in dataclasses.fields(value)
            if isinstance(v := getattr(value, f.name), torch.Tensor)
        }
        return dataclasses.replace(value, **moved)
    return value


def _call(family: str, op: Literal["quantize", "dequantize"], backend: str, *args: Any) -> Any:
    """``family``'s ``op`` on ``backend``, under the device contract (module docstring)."""
    if resolve_backend(backend) == "cpu":
        return getattr(kernels(family, "cpu"), op)(*args)
    home = next(t for a in args for t in _tensors(a)).device
    gpu = home if home.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return _to(getattr(kernels(family, "cuda"), op)(*(_to(a, gpu) for a in args)), home)


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    backend: str = "cpu",
) -> QuantState4bit:
    """NF4/FP4 blockwise quantization, byte for byte what bitsandbytes' CUDA kernel writes."""
    return _call("4bit", "quantize", backend, x, quant_type, blocksize, double_quant, quant_storage)


def dequantize_4bit(q: QuantState4bit, backend: str = "cpu") -> torch.Tensor:
    """The tensor back in its original dtype and shape, bit-exact with bitsandbytes' dequantize_4bit."""
    return _call("4bit", "dequantize", backend, q)


def quantize_blockwise8(
    x: torch.Tensor, blocksize: int = 4096, nested: bool = False, backend: str = "cpu"
) -> Blockwise8Quantized:
    """Blockwise 8-bit with the signed dynamic map (bitsandbytes quantize_blockwise)."""
    return _call("blockwise8", "quantize", backend, x, blocksize, nested)


def dequantize_blockwise8(q: Blockwise8Quantized, backend: str = "cpu") -> torch.Tensor:
    return _call("blockwise8", "dequantize", backend, q)


def quantize_int8_rowwise(x: torch.Tensor, threshold: float = 0.0, backend: str = "cpu") -> Int8Rowwise:
    """LLM.int8 row-wise int8 of a weight (cast to fp16 first, as transformers does)."""
    return _call("int8", "quantize", backend, x, threshold)


def dequantize_int8_rowwise(CB: torch.Tensor, SCB: torch.Tensor, backend: str = "cpu") -> torch.Tensor:
    return _call("int8", "dequantize", backend, CB, SCB)


def quantize(weight: torch.Tensor, settings: FormatSettings, backend: str = "cpu") -> Any:
    """``weight`` in the format ``settings`` name (a ``QuantScheme``): the record of its family."""
    family = family_of(settings.method)
    return _call(family.name, "quantize", backend, weight, *family.quantize_args(settings))


def dequantize(record: Any, backend: str = "cpu") -> torch.Tensor:
    """The values of any family's record (int8: float32, as bitsandbytes' dequantize gives them)."""
    family = family_of_record(record)
    return _call(family.name, "dequantize", backend, *family.dequantize_args(record))
