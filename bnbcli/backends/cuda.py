"""The CUDA backend: the CPU formats' functions, computed by the kernels of cuda_kernels/.

Each public function has the signature and the record of its CPU twin in ``bnbcli.formats`` and
returns the same bytes (tests/conformance/test_conformance.py runs every golden case through both). Inputs must
already be CUDA tensors; results stay on the input's device (``bnbcli.api`` moves CPU tensors for
you). Work is queued on torch's current stream of that device; the only host synchronizations are
reading the double-quantization offset back into the record's Python float (``quantize_4bit_queued``
leaves it on the device) and, with an int8 threshold, finding the outlier columns.

The launches, one checked wrapper per kernel, are cuda_launches.py's; CuPy itself is touched only in
cuda_runtime.py.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from bnbcli.backends import cuda_launches as launches
from bnbcli.errors import UsageError
from bnbcli.formats import blockwise8, fourbit
from bnbcli.formats.blockwise8 import Blockwise8Quantized
from bnbcli.formats.dtypes import dtype_name, is_float
from bnbcli.formats.fourbit import QuantState4bit
from bnbcli.formats.int8 import Int8Rowwise
from bnbcli.formats.layout import FOUR_BIT_BLOCKSIZES, NESTED_BLOCKSIZE, num_blocks
from bnbcli.formats.registry import Kernels

NESTED_ENCODER = "Dyn8L1"  # absmax is short: each CTA encodes a tile or two, too few to amortize a shared table


def _nested(
    absmax: torch.Tensor, blocksize: int, code_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level of double quantization: offset = torch's CUDA mean of absmax (bit for bit, by our
    kernels), then the dynamic 8-bit codes of absmax - offset (centering fused into the kernel), and
    the dynamic map into code_map when given. Returns (codes, nested_absmax, offset), the offset a
    one-float device tensor (nothing waits for the GPU here)."""
    mean = launches.torch_mean(absmax)
    device = absmax.device
    codes = torch.empty(absmax.numel(), dtype=torch.uint8, device=device)
    nested_absmax = torch.empty(num_blocks(absmax.numel(), blocksize), dtype=torch.float32, device=device)
    launches.quantize_blockwise(absmax, NESTED_ENCODER, blocksize, mean, codes, nested_absmax, code_map)
    return codes, nested_absmax, mean.out


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> QuantState4bit:
    """``fourbit.quantize_4bit`` on the GPU."""
    q, offset = quantize_4bit_queued(x, quant_type, blocksize, double_quant, quant_storage)
    if offset is None:
        return q
    return replace(q, nested_offset=float(offset.item()))  # the one host synchronization


def quantize_4bit_queued(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[QuantState4bit, torch.Tensor | None]:
    """``quantize_4bit`` without waiting for the GPU. With double quantization the offset is still on
    the device: the record's nested_offset is NaN and the second item is that one-float tensor, which
    ``dequantize_4bit(q, offset)`` reads at once and the caller puts into the record once it has it
    on the host (``dataclasses.replace``)."""
    fourbit.check_quantize_args(x, quant_type, blocksize, quant_storage)
    device = launches.on_gpu(x)
    x = launches.aligned(x)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=device)
    encoder = "Nf4" if quant_type == "nf4" else "Fp4"
    quant_map = launches.code_map_for(device, encoder)
    launches.quantize_blockwise(x, encoder, blocksize, None, packed, absmax, quant_map)
    common = dict(
        packed=packed.view(-1, 1) if quant_storage == torch.uint8 else fourbit.as_storage(packed, quant_storage),
        quant_map=quant_map,
        blocksize=blocksize,
        shape=tuple(x.shape),
        dtype=x.dtype,
        quant_type=quant_type,
    )
    if not double_quant:
        return QuantState4bit(absmax=absmax, **common), None  # type: ignore[arg-type]
    nested_quant_map = launches.code_map_for(device, "Dyn8")
    codes, nested_absmax, offset = _nested(absmax, NESTED_BLOCKSIZE, nested_quant_map)
    record = QuantState4bit(
        absmax=codes,
        nested_absmax=nested_absmax,
        nested_quant_map=nested_quant_map,
        nested_offset=math.nan,
        **common,  # type: ignore[arg-type]
    )
    return record, offset


def dequantize_4bit(q: QuantState4bit, offset: torch.Tensor | None = None) -> torch.Tensor:
    """``fourbit.dequantize_4bit`` on the GPU; ``offset``: the device offset of a record from
    ``quantize_4bit_queued``, used instead of its nested_offset."""
    device = launches.on_gpu(q.packed, "the packed 4-bit tensor")
    packed = fourbit.packed_bytes(q)
    if not is_float(q.dtype) or q.blocksize not in FOUR_BIT_BLOCKSIZES:
        raise UsageError(
            f"cannot dequantize to {dtype_name(q.dtype)} with blocksize {q.blocksize}",
            hint="dtype float16, bfloat16 or float32; blocksize one of " + ", ".join(map(str, FOUR_BIT_BLOCKSIZES)),
        )
    n = q.numel
    out = torch.empty(n, dtype=q.dtype, device=device)
    nested = None
    if q.nested_absmax is not None:
        assert q.nested_quant_map is not None and q.nested_offset is not None
        nested_offset = q.nested_offset if offset is None else offset
        nested = (q.nested_absmax.contiguous(), q.nested_quant_map.contiguous(), NESTED_BLOCKSIZE, nested_offset)
    lut = launches.device_tables(device)[f"lut_{q.quant_type}"]
    launches.dequantize_blockwise(4, launches.aligned(packed), n, q.blocksize, lut, q.absmax.contiguous(), nested, out)
    return out.reshape(q.shape)


def quantize_blockwise8(x: torch.Tensor, blocksize: int = 4096, nested: bool = False) -> Blockwise8Quantized:
    """``blockwise8.quantize_blockwise8`` on the GPU."""
    blockwise8.check_blocksize(blocksize)
    if not is_float(x.dtype) or x.numel() == 0:
        raise UsageError(
            f"cannot quantize a {dtype_name(x.dtype)} tensor of {x.numel()} elements",
            hint="give a non-empty fp16, bf16 or fp32 tensor",
        )
    device = launches.on_gpu(x)
    x = launches.aligned(x)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=device)
    absmax = torch.empty(num_blocks(x.numel(), blocksize), dtype=torch.float32, device=device)
    code = launches.code_map_for(device, "Dyn8")
    launches.quantize_blockwise(x, "Dyn8", blocksize, None, codes, absmax, code)
    common = dict(q=codes.reshape(x.shape), code=code, blocksize=blocksize, dtype=x.dtype)
    if not nested:
        return Blockwise8Quantized(absmax=absmax, **common)  # type: ignore[arg-type]
    nested_codes, nested_absmax, offset = _nested(absmax, blocksize, None)  # its map is `code` again
    return Blockwise8Quantized(
        absmax=nested_codes,
        nested_absmax=nested_absmax,
        nested_offset=float(offset.item()),  # the one host synchronization
        **common,  # type: ignore[arg-type]
    )


def dequantize_blockwise8(q: Blockwise8Quantized) -> torch.Tensor:
    """``blockwise8.dequantize_blockwise8`` on the GPU."""
    device = launches.on_gpu(q.q, "the 8-bit codes")
    codes = launches.aligned(q.q.reshape(-1))
    n = codes.numel()
    out = torch.empty(n, dtype=q.dtype, device=device)
    nested = None
    if q.nested_absmax is not None:
        assert q.nested_offset is not None
        nested = (q.nested_absmax.contiguous(), q.code.contiguous(), q.blocksize, q.nested_offset)
    blockwise8.check_blocksize(q.blocksize)
    launches.dequantize_blockwise(8, codes, n, q.blocksize, q.code.contiguous(), q.absmax.contiguous(), nested, out)
    return out.reshape(q.q.shape)


def quantize_int8_rowwise(x: torch.Tensor, threshold: float = 0.0) -> Int8Rowwise:
    """``int8.quantize_int8_rowwise`` on the GPU (the fp16 cast happens inside the kernel)."""
    if not is_float(x.dtype):
        raise UsageError(f"cannot quantize a {dtype_name(x.dtype)} tensor", hint="give fp16, bf16 or fp32")
    if x.numel() == 0:
        raise UsageError("cannot quantize an empty tensor", hint="give a tensor with elements")
    device = launches.on_gpu(x)
    rows = launches.aligned(x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1))
    nrows, cols = rows.shape
    cb = torch.empty((nrows, cols), dtype=torch.int8, device=device)
    scb = torch.empty(nrows, dtype=torch.float32, device=device)
    col_flags = torch.zeros(cols, dtype=torch.uint8, device=device) if threshold > 0.0 else None
    launches.int8_row_quant(rows, threshold, cb, scb, col_flags)
    outlier_cols = None
    if col_flags is not None:
        outliers = col_flags.bool()
        outlier_cols = torch.nonzero(outliers).reshape(-1)
        if nrows > 1:  # bitsandbytes zeroes outlier columns in every row (the kernel did the outliers)
            cb.masked_fill_(outliers, 0)
    return Int8Rowwise(CB=cb.reshape(x.shape), SCB=scb, outlier_cols=outlier_cols)


def dequantize_int8_rowwise(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """``int8.dequantize_int8_rowwise`` on the GPU: float32 with CB's shape."""
    device = launches.on_gpu(CB, "CB")
    rows = launches.aligned(CB.reshape(-1, CB.shape[-1]) if CB.dim() > 0 else CB.reshape(1, 1))
    out = torch.empty(rows.shape, dtype=torch.float32, device=device)
    launches.int8_row_dequant(rows, SCB.reshape(-1).contiguous(), rows.shape[1], out)
    return out.reshape(CB.shape)


# The functions above by format family (bnbcli.formats.registry picks them for the "cuda" backend).
KERNELS = {
    "4bit": Kernels(quantize_4bit, dequantize_4bit, quantize_4bit_queued),
    "int8": Kernels(quantize_int8_rowwise, dequantize_int8_rowwise),
    "blockwise8": Kernels(quantize_blockwise8, dequantize_blockwise8),
}
