"""The public Python API: every format with a ``backend`` argument, as ``bnbcli`` exports it.

``backend="cuda"`` runs the kernels of cuda_kernels/ and returns the bytes ``backend="cpu"`` returns.
Device contract: tensors on a GPU are quantized there and the results stay on that GPU; CPU tensors
are copied to the current GPU, and every tensor of the result is copied back to the CPU, so the
result always lives where the input did. ``backend="auto"`` is cuda when it can run, else cpu.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

from bnbcli.backends import resolve_backend
from bnbcli.formats import blockwise8, fourbit, int8
from bnbcli.formats.blockwise8 import Blockwise8Quantized
from bnbcli.formats.fourbit import QuantState4bit
from bnbcli.formats.int8 import Int8Rowwise

Record = TypeVar("Record", QuantState4bit, Blockwise8Quantized, Int8Rowwise)


def _gpu(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_cuda else t.to(torch.device("cuda", torch.cuda.current_device()))


def _move(record: Record, device: torch.device) -> Record:
    """The record with every tensor field on ``device`` (no copy for those already there)."""
    moved: dict[str, object] = {
        f.name: value.to(device)
        for f in dataclasses.fields(record)
        if isinstance(value := getattr(record, f.name), torch.Tensor)
    }
    return dataclasses.replace(record, **moved)  # type: ignore[arg-type]


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    backend: str = "cpu",
) -> QuantState4bit:
    """NF4/FP4 blockwise quantization, byte for byte what bitsandbytes' CUDA kernel writes."""
    if resolve_backend(backend) == "cuda":
        from bnbcli.backends import cuda

        return _move(cuda.quantize_4bit(_gpu(x), quant_type, blocksize, double_quant, quant_storage), x.device)
    return fourbit.quantize_4bit(x, quant_type, blocksize, double_quant, quant_storage)


def dequantize_4bit(q: QuantState4bit, backend: str = "cpu") -> torch.Tensor:
    """The tensor back in its original dtype and shape, bit-exact with bitsandbytes' dequantize_4bit."""
    if resolve_backend(backend) == "cuda":
        from bnbcli.backends import cuda

        home = q.packed.device
        return cuda.dequantize_4bit(q if q.packed.is_cuda else _move(q, _gpu(q.packed).device)).to(home)
    return fourbit.dequantize_4bit(q)


def quantize_blockwise8(
    x: torch.Tensor, blocksize: int = 4096, nested: bool = False, backend: str = "cpu"
) -> Blockwise8Quantized:
    """Blockwise 8-bit with the signed dynamic map (bitsandbytes quantize_blockwise)."""
    if resolve_backend(backend) == "cuda":
        from bnbcli.backends import cuda

        return _move(cuda.quantize_blockwise8(_gpu(x), blocksize, nested), x.device)
    return blockwise8.quantize_blockwise8(x, blocksize, nested)


def dequantize_blockwise8(q: Blockwise8Quantized, backend: str = "cpu") -> torch.Tensor:
    if resolve_backend(backend) == "cuda":
        from bnbcli.backends import cuda

        home = q.q.device
        return cuda.dequantize_blockwise8(q if q.q.is_cuda else _move(q, _gpu(q.q).device)).to(home)
    return blockwise8.dequantize_blockwise8(q)


def quantize_int8_rowwise(x: torch.Tensor, threshold: float = 0.0, backend: str = "cpu") -> Int8Rowwise:
    """LLM.int8 row-wise int8 of a weight (cast to fp16 first, as transformers does)."""
    if resolve_backend(backend) == "cuda":
        from bnbcli.backends import cuda

        return _move(cuda.quantize_int8_rowwise(_gpu(x), threshold), x.device)
    return int8.quantize_int8_rowwise(x, threshold)


def dequantize_int8_rowwise(CB: torch.Tensor, SCB: torch.Tensor, backend: str = "cpu") -> torch.Tensor:
    if resolve_backend(backend) == "cuda":
        from bnbcli.backends import cuda

        return cuda.dequantize_int8_rowwise(_gpu(CB), SCB.to(_gpu(CB).device)).to(CB.device)
    return int8.dequantize_int8_rowwise(CB, SCB)
