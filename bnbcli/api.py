"""The public Python API: every format with a ``backend`` argument, as ``bnbcli`` exports it."""

from __future__ import annotations

import torch

from bnbcli.backends import resolve_backend
from bnbcli.formats import blockwise8, fourbit, int8
from bnbcli.formats.blockwise8 import Blockwise8Quantized
from bnbcli.formats.fourbit import QuantState4bit
from bnbcli.formats.int8 import Int8Rowwise


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
    backend: str = "cpu",
) -> QuantState4bit:
    """NF4/FP4 blockwise quantization, byte for byte what bitsandbytes' CUDA kernel writes."""
    resolve_backend(backend)
    return fourbit.quantize_4bit(x, quant_type, blocksize, double_quant, quant_storage)


def dequantize_4bit(q: QuantState4bit, backend: str = "cpu") -> torch.Tensor:
    """The tensor back in its original dtype and shape, bit-exact with bitsandbytes' dequantize_4bit."""
    resolve_backend(backend)
    return fourbit.dequantize_4bit(q)


def quantize_blockwise8(
    x: torch.Tensor, blocksize: int = 4096, nested: bool = False, backend: str = "cpu"
) -> Blockwise8Quantized:
    """Blockwise 8-bit with the signed dynamic map (bitsandbytes quantize_blockwise)."""
    resolve_backend(backend)
    return blockwise8.quantize_blockwise8(x, blocksize, nested)


def dequantize_blockwise8(q: Blockwise8Quantized, backend: str = "cpu") -> torch.Tensor:
    resolve_backend(backend)
    return blockwise8.dequantize_blockwise8(q)


def quantize_int8_rowwise(x: torch.Tensor, threshold: float = 0.0, backend: str = "cpu") -> Int8Rowwise:
    """LLM.int8 row-wise int8 of a weight (cast to fp16 first, as transformers does)."""
    resolve_backend(backend)
    return int8.quantize_int8_rowwise(x, threshold)


def dequantize_int8_rowwise(CB: torch.Tensor, SCB: torch.Tensor, backend: str = "cpu") -> torch.Tensor:
    resolve_backend(backend)
    return int8.dequantize_int8_rowwise(CB, SCB)
