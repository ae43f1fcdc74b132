"""The CUDA backend: the CPU formats' functions, computed by the kernels of cuda_kernels/.

Each public function has the signature and the record of its CPU twin in ``bnbcli.formats`` and
returns the same bytes (tests/test_conformance.py runs every golden case through both). Inputs must
already be CUDA tensors; results stay on the input's device (``bnbcli.api`` moves CPU tensors for
you). Work is queued on torch's current stream of that device; the only host synchronizations are
reading the double-quantization offset back into the record's Python float (``quantize_4bit_queued``
leaves it on the device) and, with an int8 threshold, finding the outlier columns.

One private wrapper per kernel (``_quantize_blockwise``, ``_torch_mean``, ``_dequantize_blockwise``,
``_int8_row_quant``, ``_int8_row_dequant``) checks dtypes, contiguity, devices, alignment and sizes, since CuPy checks
nothing, and passes scalars as explicit numpy types. CuPy itself is touched only in cuda_runtime.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch

from bnbcli.backends import cuda_tables
from bnbcli.backends.cuda_runtime import (
    ELEMENT_TYPES,
    NULL,
    THREADS,
    launch,
    reduce_geometry,
    resident_ctas,
    sm_count,
)
from bnbcli.errors import InputError, InternalError, UsageError
from bnbcli.formats import blockwise8, fourbit
from bnbcli.formats.blocks import num_blocks
from bnbcli.formats.blockwise8 import Blockwise8Quantized
from bnbcli.formats.codes import DYNAMIC_CODE, FOUR_BIT_BLOCKSIZES, NESTED_BLOCKSIZE
from bnbcli.formats.cuda_mean import reduce_config
from bnbcli.formats.fourbit import FLOAT_DTYPES, QuantState4bit, dtype_name
from bnbcli.formats.int8 import Int8Rowwise

TILE_ELEMENTS = THREADS * 16  # quantize_blockwise.cu: 16 elements per thread


def _check(t: torch.Tensor, what: str, dtype: torch.dtype, device: torch.device, numel: int | None = None) -> None:
    """The contract of a kernel argument: its dtype, contiguous, on the kernel's device, its size."""
    if t.dtype != dtype:
        raise UsageError(
            f"{what} must be {dtype_name(dtype)}, not {dtype_name(t.dtype)}", hint=f"cast it to {dtype_name(dtype)}"
        )
    if t.get_device() != (device.index if device.type == "cuda" else -1):  # get_device() is -1 on the CPU
        raise UsageError(f"{what} is on {t.device}, the kernel runs on {device}", hint="move every tensor to one GPU")
    if not t.is_contiguous():
        raise UsageError(f"{what} must be contiguous", hint="pass .contiguous()")
    if numel is not None and t.numel() != numel:
        raise UsageError(f"{what} has {t.numel()} elements, expected {numel}", hint="the state is inconsistent")


def _on_gpu(x: torch.Tensor, what: str = "the tensor") -> torch.device:
    if x.device.type != "cuda":
        raise UsageError(f"{what} is on {x.device}; the cuda backend takes CUDA tensors", hint="use bnbcli.api")
    return x.device


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels' vector loads), copying only when it is not."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


@cache
def _device_tables(device: torch.device) -> dict[str, torch.Tensor]:
    """Every constant table, uploaded once per device (int32 carries the uint32 bit patterns)."""

    def up(a: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
        return t.to(device)

    dynamic_table = up(cuda_tables.dynamic_table().view(np.int32))
    return {
        "Nf4": up(cuda_tables.lane_lut("nf4").view(np.int32)),
        "Fp4": up(cuda_tables.lane_lut("fp4").view(np.int32)),
        "Dyn8": dynamic_table,
        "Dyn8L1": dynamic_table,  # the same encoder, its table read through L1 instead of shared memory
        "lut_nf4": up(cuda_tables.dequant_lut("nf4")),
        "lut_fp4": up(cuda_tables.dequant_lut("fp4")),
        "quant_map_nf4": up(cuda_tables.quant_map("nf4")),
        "quant_map_fp4": up(cuda_tables.quant_map("fp4")),
        "dynamic": up(DYNAMIC_CODE),
    }


# --------------------------------------------------------------------------------------------------
# One wrapper per kernel


@dataclass(frozen=True)
class _TorchMean:
    """torch's CUDA mean of a float32 tensor, under way: kTorchMeanPartials' per-CTA sums, folded by
    the kernel that consumes the mean, which stores it in ``out``."""

    partials: torch.Tensor
    width: int
    factor: np.float32
    out: torch.Tensor

    def kernel_args(self) -> tuple:
        return (self.partials, np.int32(self.partials.numel()), np.int32(self.width), self.factor, self.out)


def _torch_mean(x: torch.Tensor) -> _TorchMean:
    """kTorchMeanPartials over x: the first stage of ``x.mean()`` exactly as torch computes it on this
    GPU (bitsandbytes' nested offset; see torch_mean.cuh)."""
    device = _on_gpu(x)
    _check(x, "mean input", torch.float32, device)
    n = x.numel()
    if not 0 < n < 2**31 or x.data_ptr() % 16 or not x.is_contiguous():
        raise InternalError(f"kTorchMeanPartials: needs a contiguous, aligned tensor of 1 ... 2**31-1 floats, not {n}")
    config = reduce_config(n, *reduce_geometry(device.index))
    partials = torch.empty(config["ctas"], dtype=torch.float32, device=device)
    width, vectorized = np.int32(config["block_width"]), np.int32(config["vectorize_input"])
    args = (x, np.int64(n), width, vectorized, partials)
    launch(device, "quantize_blockwise.cu", "kTorchMeanPartials", config["ctas"], args)
    out = torch.empty(1, dtype=torch.float32, device=device)
    return _TorchMean(partials, int(width), np.float32(1.0) / np.float32(n), out)


# CTAs per resident slot. One (a persistent grid) suits the 4-bit encoders; the shared-table 8-bit
# encoder ran faster with four waves of CTAs on an H100 (8192x8192 bf16, blocksize 4096: 92.4 us with
# one, 89.7 with two, 89.0 with four; `bench/bench_kernels_cuda.py --grid-waves N` repeats it).
GRID_WAVES = {"Dyn8": 4}

# The code map each encoder's records carry (kQuantizeBlockwise writes the record's copy of it).
ENCODER_MAPS = {"Nf4": "quant_map_nf4", "Fp4": "quant_map_fp4", "Dyn8": "dynamic", "Dyn8L1": "dynamic"}


def _quantize_blockwise(
    x: torch.Tensor,
    encoder: str,
    blocksize: int,
    mean: _TorchMean | None,
    out: torch.Tensor,
    absmax: torch.Tensor,
    code_map: torch.Tensor | None,
) -> None:
    """kQuantizeBlockwise<In, Nf4|Fp4|Dyn8|Dyn8L1>: codes of x (minus its mean, when given) into out, block
    absmax into absmax, and the encoder's code map into code_map when given (the record's own copy)."""
    device = _on_gpu(x)
    if x.dtype not in ELEMENT_TYPES or x.data_ptr() % 16 or not x.is_contiguous():
        raise InternalError("kQuantizeBlockwise takes a contiguous, 16-byte aligned fp16/bf16/fp32 tensor")
    n = x.numel()
    if n == 0 or n >= 2**62 or blocksize not in (16 << k for k in range(1, 9)):
        raise InternalError(f"kQuantizeBlockwise: n={n}, blocksize={blocksize} out of range")
    _check(out, "codes", torch.uint8, device, n if encoder.startswith("Dyn8") else (n + 1) // 2)
    _check(absmax, "absmax", torch.float32, device, num_blocks(n, blocksize))
    mean_args: tuple = (NULL, np.int32(1), np.int32(1), np.float32(0.0), NULL)
    if mean is not None:
        _check(mean.out, "mean", torch.float32, device, 1)
        _check(mean.partials, "mean partials", torch.float32, device)
        mean_args = mean.kernel_args()
    tables = _device_tables(device)
    map_src = tables[ENCODER_MAPS[encoder]]
    map_args: tuple = (NULL, np.int32(0), NULL)
    if code_map is not None:
        _check(code_map, "code map", torch.float32, device, map_src.numel())
        map_args = (map_src, np.int32(map_src.numel()), code_map)
    name = f"kQuantizeBlockwise<{ELEMENT_TYPES[x.dtype]}, {encoder}>"
    source = "quantize_blockwise.cu"
    tiles = -(-n // TILE_ELEMENTS)
    grid = min(tiles, sm_count(device.index) * resident_ctas(device.index, source, name) * GRID_WAVES.get(encoder, 1))
    args = (x, np.int64(n), np.int32(blocksize.bit_length() - 1), *mean_args, tables[encoder])
    launch(device, source, name, grid, (*args, *map_args, out, absmax))


def _dequantize_blockwise(
    bits: int,
    codes: torch.Tensor,
    n: int,
    blocksize: int,
    table: torch.Tensor,
    absmax: torch.Tensor,
    nested: tuple[torch.Tensor, torch.Tensor, int, float | torch.Tensor] | None,
    out: torch.Tensor,
) -> None:
    """kDequantize4bit/8bit<Out>: out = table[code] * block scale; ``absmax`` is float32 scales, or with
    ``nested`` = (nested_absmax, nested_code, nested_blocksize, offset) the uint8 codes of the scales
    (the offset a float, or a one-float device tensor the kernel reads)."""
    device = _on_gpu(codes)
    n_codes = (n + 1) // 2 if bits == 4 else n
    _check(codes, "codes", torch.uint8, device, n_codes)
    if codes.data_ptr() % 16:
        raise InternalError("kDequantize: codes must be 16-byte aligned")
    _check(table, "code table", torch.float32, device, 16 if bits == 4 else 256)
    _check(out, "output", out.dtype, device, n)
    if out.dtype not in ELEMENT_TYPES or out.data_ptr() % 16:
        raise InternalError("kDequantize: the output must be a 16-byte aligned fp16/bf16/fp32 tensor")
    blocks = num_blocks(n, blocksize)
    # Kernel parameters after the code table: 4-bit (absmax, qabsmax, nested_absmax, nested_code,
    # log2_nested, offset, offset_at); 8-bit the same without nested_code (it reads the nested codes
    # with `code`).
    if nested is None:
        _check(absmax, "absmax", torch.float32, device, blocks)
        scales: tuple = (absmax, NULL, NULL, NULL, np.int32(0), np.float32(0.0), NULL)
    else:
        nested_absmax, nested_code, nested_blocksize, offset = nested
        _check(absmax, "absmax", torch.uint8, device, blocks)
        _check(nested_absmax, "nested_absmax", torch.float32, device, num_blocks(blocks, nested_blocksize))
        _check(nested_code, "nested code", torch.float32, device, 256)
        log2_nested = np.int32(nested_blocksize.bit_length() - 1)
        if isinstance(offset, torch.Tensor):
            _check(offset, "nested offset", torch.float32, device, 1)
            offset_args: tuple = (np.float32(0.0), offset)
        else:
            offset_args = (np.float32(offset), NULL)
        scales = (NULL, absmax, nested_absmax, nested_code, log2_nested, *offset_args)
    if bits == 8:
        scales = scales[:3] + scales[4:]
    per_thread = 32 if bits == 4 else 16  # DEQUANT4_CHUNKS / DEQUANT8_CHUNKS chunks of 8
    grid = -(-n // (THREADS * per_thread))
    name = f"kDequantize{bits}bit<{ELEMENT_TYPES[out.dtype]}>"
    args = (codes, np.int64(n), np.int32(blocksize.bit_length() - 1), table, *scales, out)
    launch(device, "dequantize_blockwise.cu", name, grid, args)


def _int8_row_quant(
    rows: torch.Tensor, threshold: float, cb: torch.Tensor, scb: torch.Tensor, col_flags: torch.Tensor | None
) -> None:
    """kInt8RowQuant<In>: one CTA per row of the 2-D ``rows``."""
    device = _on_gpu(rows)
    if rows.dim() != 2 or rows.dtype not in ELEMENT_TYPES or not rows.is_contiguous():
        raise InternalError("kInt8RowQuant takes a contiguous 2-D fp16/bf16/fp32 tensor")
    nrows, cols = rows.shape
    if nrows >= 2**31 or cols >= 2**31 or nrows * cols == 0:
        raise InternalError(f"kInt8RowQuant: {nrows} x {cols} is out of range")
    _check(cb, "CB", torch.int8, device, nrows * cols)
    _check(scb, "SCB", torch.float32, device, nrows)
    if col_flags is not None:
        _check(col_flags, "column flags", torch.uint8, device, cols)
    vectorized = cols % 8 == 0 and rows.data_ptr() % 16 == 0 and cb.data_ptr() % 16 == 0
    args = (rows, np.int32(cols), np.int32(vectorized), np.float32(threshold), cb, scb)
    name = f"kInt8RowQuant<{ELEMENT_TYPES[rows.dtype]}>"
    launch(device, "int8_rowwise.cu", name, nrows, (*args, NULL if col_flags is None else col_flags))


def _int8_row_dequant(cb: torch.Tensor, scb: torch.Tensor, cols: int, out: torch.Tensor) -> None:
    """kInt8RowDequant: out = (CB * SCB[row]) * (1/127) in float32."""
    device = _on_gpu(cb)
    n = cb.numel()
    _check(cb, "CB", torch.int8, device)
    _check(scb, "SCB", torch.float32, device, n // cols)
    _check(out, "output", torch.float32, device, n)
    if cb.data_ptr() % 16 or out.data_ptr() % 16 or n % cols:
        raise InternalError("kInt8RowDequant: CB and the output must be 16-byte aligned whole rows")
    grid = -(-n // (THREADS * 16))
    launch(device, "int8_rowwise.cu", "kInt8RowDequant", grid, (cb, scb, np.int64(n), np.int32(cols), out))


# --------------------------------------------------------------------------------------------------
# The formats (same signatures and records as bnbcli.formats)


NESTED_ENCODER = "Dyn8L1"  # absmax is short: each CTA encodes a tile or two, too few to amortize a shared table


def _nested(
    absmax: torch.Tensor, blocksize: int, code_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level of double quantization: offset = torch's CUDA mean of absmax (bit for bit, by our
    kernels), then the dynamic 8-bit codes of absmax - offset (centering fused into the kernel), and
    the dynamic map into code_map when given. Returns (codes, nested_absmax, offset), the offset a
    one-float device tensor (nothing waits for the GPU here)."""
    mean = _torch_mean(absmax)
    device = absmax.device
    codes = torch.empty(absmax.numel(), dtype=torch.uint8, device=device)
    nested_absmax = torch.empty(num_blocks(absmax.numel(), blocksize), dtype=torch.float32, device=device)
    _quantize_blockwise(absmax, NESTED_ENCODER, blocksize, mean, codes, nested_absmax, code_map)
    return codes, nested_absmax, mean.out


def _code_map(device: torch.device, encoder: str) -> torch.Tensor:
    """Room for a record's own code map, which the quantize kernel fills (records must not share
    storage: safetensors refuses it)."""
    return torch.empty(_device_tables(device)[ENCODER_MAPS[encoder]].numel(), dtype=torch.float32, device=device)


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
    fourbit._check_args(x, quant_type, blocksize, quant_storage)
    device = _on_gpu(x)
    x = _aligned(x)
    n = x.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=device)
    encoder = "Nf4" if quant_type == "nf4" else "Fp4"
    quant_map = _code_map(device, encoder)
    _quantize_blockwise(x, encoder, blocksize, None, packed, absmax, quant_map)
    common = dict(
        packed=packed.view(-1, 1) if quant_storage == torch.uint8 else fourbit._as_storage(packed, quant_storage),
        quant_map=quant_map,
        blocksize=blocksize,
        shape=tuple(x.shape),
        dtype=x.dtype,
        quant_type=quant_type,
    )
    if not double_quant:
        return QuantState4bit(absmax=absmax, **common), None  # type: ignore[arg-type]
    nested_quant_map = _code_map(device, "Dyn8")
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
    device = _on_gpu(q.packed, "the packed 4-bit tensor")
    n = q.numel
    packed = q.packed.contiguous().view(torch.uint8).reshape(-1)
    needed = (n + 1) // 2
    if not 0 <= needed - packed.numel() < q.packed.element_size() or num_blocks(n, q.blocksize) != q.absmax.numel():
        raise InputError(
            f"4-bit state does not fit shape {list(q.shape)}", hint="the checkpoint is inconsistent; export it again"
        )
    if q.dtype not in FLOAT_DTYPES or q.blocksize not in FOUR_BIT_BLOCKSIZES:
        raise UsageError(
            f"cannot dequantize to {dtype_name(q.dtype)} with blocksize {q.blocksize}",
            hint="dtype float16, bfloat16 or float32; blocksize one of " + ", ".join(map(str, FOUR_BIT_BLOCKSIZES)),
        )
    if packed.numel() < needed:  # a 2- or 4-byte quant_storage dropped the last partial element's bytes
        packed = torch.cat((packed, packed.new_zeros(needed - packed.numel())))
    out = torch.empty(n, dtype=q.dtype, device=device)
    nested = None
    if q.nested_absmax is not None:
        assert q.nested_quant_map is not None and q.nested_offset is not None
        nested_offset = q.nested_offset if offset is None else offset
        nested = (q.nested_absmax.contiguous(), q.nested_quant_map.contiguous(), NESTED_BLOCKSIZE, nested_offset)
    lut = _device_tables(device)[f"lut_{q.quant_type}"]
    _dequantize_blockwise(4, _aligned(packed), n, q.blocksize, lut, q.absmax.contiguous(), nested, out)
    return out.reshape(q.shape)


def quantize_blockwise8(x: torch.Tensor, blocksize: int = 4096, nested: bool = False) -> Blockwise8Quantized:
    """``blockwise8.quantize_blockwise8`` on the GPU."""
    blockwise8._check_blocksize(blocksize)
    if x.dtype not in FLOAT_DTYPES or x.numel() == 0:
        raise UsageError(
            f"cannot quantize a {dtype_name(x.dtype)} tensor of {x.numel()} elements",
            hint="give a non-empty fp16, bf16 or fp32 tensor",
        )
    device = _on_gpu(x)
    x = _aligned(x)
    codes = torch.empty(x.numel(), dtype=torch.uint8, device=device)
    absmax = torch.empty(num_blocks(x.numel(), blocksize), dtype=torch.float32, device=device)
    code = _code_map(device, "Dyn8")
    _quantize_blockwise(x, "Dyn8", blocksize, None, codes, absmax, code)
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
    device = _on_gpu(q.q, "the 8-bit codes")
    codes = _aligned(q.q.reshape(-1))
    n = codes.numel()
    out = torch.empty(n, dtype=q.dtype, device=device)
    nested = None
    if q.nested_absmax is not None:
        assert q.nested_offset is not None
        nested = (q.nested_absmax.contiguous(), q.code.contiguous(), q.blocksize, q.nested_offset)
    blockwise8._check_blocksize(q.blocksize)
    _dequantize_blockwise(8, codes, n, q.blocksize, q.code.contiguous(), q.absmax.contiguous(), nested, out)
    return out.reshape(q.q.shape)


def quantize_int8_rowwise(x: torch.Tensor, threshold: float = 0.0) -> Int8Rowwise:
    """``int8.quantize_int8_rowwise`` on the GPU (the fp16 cast happens inside the kernel)."""
    if x.dtype not in FLOAT_DTYPES:
        raise UsageError(f"cannot quantize a {dtype_name(x.dtype)} tensor", hint="give fp16, bf16 or fp32")
    if x.numel() == 0:
        raise UsageError("cannot quantize an empty tensor", hint="give a tensor with elements")
    device = _on_gpu(x)
    rows = _aligned(x.reshape(-1, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1))
    nrows, cols = rows.shape
    cb = torch.empty((nrows, cols), dtype=torch.int8, device=device)
    scb = torch.empty(nrows, dtype=torch.float32, device=device)
    col_flags = torch.zeros(cols, dtype=torch.uint8, device=device) if threshold > 0.0 else None
    _int8_row_quant(rows, threshold, cb, scb, col_flags)
    outlier_cols = None
    if col_flags is not None:
        outliers = col_flags.bool()
        outlier_cols = torch.nonzero(outliers).reshape(-1)
        if nrows > 1:  # bitsandbytes zeroes outlier columns in every row (the kernel did the outliers)
            cb.masked_fill_(outliers, 0)
    return Int8Rowwise(CB=cb.reshape(x.shape), SCB=scb, outlier_cols=outlier_cols)


def dequantize_int8_rowwise(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """``int8.dequantize_int8_rowwise`` on the GPU: float32 with CB's shape."""
    device = _on_gpu(CB, "CB")
    rows = _aligned(CB.reshape(-1, CB.shape[-1]) if CB.dim() > 0 else CB.reshape(1, 1))
    out = torch.empty(rows.shape, dtype=torch.float32, device=device)
    _int8_row_dequant(rows, SCB.reshape(-1).contiguous(), rows.shape[1], out)
    return out.reshape(CB.shape)
