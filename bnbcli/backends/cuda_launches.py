"""One checked launch per kernel of cuda_kernels/: the CUDA backend's formats (cuda.py) are built from these.

CuPy checks nothing, so each wrapper (``quantize_blockwise``, ``torch_mean``, ``dequantize_blockwise``,
``int8_row_quant``, ``int8_row_dequant``) checks dtypes, contiguity, devices, alignment and sizes, and passes
scalars as explicit numpy types. Loading and compiling the kernels is cuda_runtime.py's (the only module that
touches CuPy).
"""

from __future__ import annotations

from dataclasses import dataclass
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
from bnbcli.errors import InternalError, UsageError
from bnbcli.formats.codes import DYNAMIC_CODE
from bnbcli.formats.cuda_mean import reduce_config
from bnbcli.formats.dtypes import dtype_name
from bnbcli.formats.layout import num_blocks

TILE_ELEMENTS = THREADS * 16  # quantize_blockwise.cu: 16 elements per thread


def check(t: torch.Tensor, what: str, dtype: torch.dtype, device: torch.device, numel: int | None = None) -> None:
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


def on_gpu(x: torch.Tensor, what: str = "the tensor") -> torch.device:
    if x.device.type != "cuda":
        raise UsageError(f"{what} is on {x.device}; the cuda backend takes CUDA tensors", hint="use bnbcli.api")
    return x.device


def aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels' vector loads), copying only when it is not."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


@cache
def device_tables(device: torch.device) -> dict[str, torch.Tensor]:
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


@dataclass(frozen=True)
class TorchMean:
    """torch's CUDA mean of a float32 tensor, under way: kTorchMeanPartials' per-CTA sums, folded by
    the kernel that consumes the mean, which stores it in ``out``."""

    partials: torch.Tensor
    width: int
    factor: np.float32
    out: torch.Tensor

    def kernel_args(self) -> tuple:
        return (self.partials, np.int32(self.partials.numel()), np.int32(self.width), self.factor, self.out)


def torch_mean(x: torch.Tensor) -> TorchMean:
    """kTorchMeanPartials over x: the first stage of ``x.mean()`` exactly as torch computes it on this
    GPU (bitsandbytes' nested offset; see torch_mean.cuh)."""
    device = on_gpu(x)
    check(x, "mean input", torch.float32, device)
    n = x.numel()
    if not 0 < n < 2**31 or x.data_ptr() % 16 or not x.is_contiguous():
        raise InternalError(f"kTorchMeanPartials: needs a contiguous, aligned tensor of 1 ... 2**31-1 floats, not {n}")
    config = reduce_config(n, *reduce_geometry(device.index))
    partials = torch.empty(config["ctas"], dtype=torch.float32, device=device)
    width, vectorized = np.int32(config["block_width"]), np.int32(config["vectorize_input"])
    args = (x, np.int64(n), width, vectorized, partials)
    launch(device, "quantize_blockwise.cu", "kTorchMeanPartials", config["ctas"], args)
    out = torch.empty(1, dtype=torch.float32, device=device)
    return TorchMean(partials, int(width), np.float32(1.0) / np.float32(n), out)


# CTAs per resident slot. One (a persistent grid) suits the 4-bit encoders; the shared-table 8-bit
# encoder ran faster with four waves of CTAs on an H100 (8192x8192 bf16, blocksize 4096: 92.4 us with
# one, 89.7 with two, 89.0 with four; `bench/bench_kernels_cuda.py --grid-waves N` repeats it).
GRID_WAVES = {"Dyn8": 4}

# The code map each encoder's records carry (kQuantizeBlockwise writes the record's copy of it).
ENCODER_MAPS = {"Nf4": "quant_map_nf4", "Fp4": "quant_map_fp4", "Dyn8": "dynamic", "Dyn8L1": "dynamic"}


def quantize_blockwise(
    x: torch.Tensor,
    encoder: str,
    blocksize: int,
    mean: TorchMean | None,
    out: torch.Tensor,
    absmax: torch.Tensor,
    code_map: torch.Tensor | None,
) -> None:
    """kQuantizeBlockwise<In, Nf4|Fp4|Dyn8|Dyn8L1>: codes of x (minus its mean, when given) into out, block
    absmax into absmax, and the encoder's code map into code_map when given (the record's own copy)."""
    device = on_gpu(x)
    if x.dtype not in ELEMENT_TYPES or x.data_ptr() % 16 or not x.is_contiguous():
        raise InternalError("kQuantizeBlockwise takes a contiguous, 16-byte aligned fp16/bf16/fp32 tensor")
    n = x.numel()
    if n == 0 or n >= 2**62 or blocksize not in (16 << k for k in range(1, 9)):
        raise InternalError(f"kQuantizeBlockwise: n={n}, blocksize={blocksize} out of range")
    check(out, "codes", torch.uint8, device, n if encoder.startswith("Dyn8") else (n + 1) // 2)
    check(absmax, "absmax", torch.float32, device, num_blocks(n, blocksize))
    mean_args: tuple = (NULL, np.int32(1), np.int32(1), np.float32(0.0), NULL)
    if mean is not None:
        check(mean.out, "mean", torch.float32, device, 1)
        check(mean.partials, "mean partials", torch.float32, device)
        mean_args = mean.kernel_args()
    tables = device_tables(device)
    map_src = tables[ENCODER_MAPS[encoder]]
    map_args: tuple = (NULL, np.int32(0), NULL)
    if code_map is not None:
        check(code_map, "code map", torch.float32, device, map_src.numel())
        map_args = (map_src, np.int32(map_src.numel()), code_map)
    name = f"kQuantizeBlockwise<{ELEMENT_TYPES[x.dtype]}, {encoder}>"
    source = "quantize_blockwise.cu"
    tiles = -(-n // TILE_ELEMENTS)
    grid = min(tiles, sm_count(device.index) * resident_ctas(device.index, source, name) * GRID_WAVES.get(encoder, 1))
    args = (x, np.int64(n), np.int32(blocksize.bit_length() - 1), *mean_args, tables[encoder])
    launch(device, source, name, grid, (*args, *map_args, out, absmax))


def dequantize_blockwise(
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
    device = on_gpu(codes)
    n_codes = (n + 1) // 2 if bits == 4 else n
    check(codes, "codes", torch.uint8, device, n_codes)
    if codes.data_ptr() % 16:
        raise InternalError("kDequantize: codes must be 16-byte aligned")
    check(table, "code table", torch.float32, device, 16 if bits == 4 else 256)
    check(out, "output", out.dtype, device, n)
    if out.dtype not in ELEMENT_TYPES or out.data_ptr() % 16:
        raise InternalError("kDequantize: the output must be a 16-byte aligned fp16/bf16/fp32 tensor")
    blocks = num_blocks(n, blocksize)
    # Kernel parameters after the code table: 4-bit (absmax, qabsmax, nested_absmax, nested_code,
    # log2_nested, offset, offset_at); 8-bit the same without nested_code (it reads the nested codes
    # with `code`).
    if nested is None:
        check(absmax, "absmax", torch.float32, device, blocks)
        scales: tuple = (absmax, NULL, NULL, NULL, np.int32(0), np.float32(0.0), NULL)
    else:
        nested_absmax, nested_code, nested_blocksize, offset = nested
        check(absmax, "absmax", torch.uint8, device, blocks)
        check(nested_absmax, "nested_absmax", torch.float32, device, num_blocks(blocks, nested_blocksize))
        check(nested_code, "nested code", torch.float32, device, 256)
        log2_nested = np.int32(nested_blocksize.bit_length() - 1)
        if isinstance(offset, torch.Tensor):
            check(offset, "nested offset", torch.float32, device, 1)
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


def int8_row_quant(
    rows: torch.Tensor, threshold: float, cb: torch.Tensor, scb: torch.Tensor, col_flags: torch.Tensor | None
) -> None:
    """kInt8RowQuant<In>: one CTA per row of the 2-D ``rows``."""
    device = on_gpu(rows)
    if rows.dim() != 2 or rows.dtype not in ELEMENT_TYPES or not rows.is_contiguous():
        raise InternalError("kInt8RowQuant takes a contiguous 2-D fp16/bf16/fp32 tensor")
    nrows, cols = rows.shape
    if nrows >= 2**31 or cols >= 2**31 or nrows * cols == 0:
        raise InternalError(f"kInt8RowQuant: {nrows} x {cols} is out of range")
    check(cb, "CB", torch.int8, device, nrows * cols)
    check(scb, "SCB", torch.float32, device, nrows)
    if col_flags is not None:
        check(col_flags, "column flags", torch.uint8, device, cols)
    vectorized = cols % 8 == 0 and rows.data_ptr() % 16 == 0 and cb.data_ptr() % 16 == 0
    args = (rows, np.int32(cols), np.int32(vectorized), np.float32(threshold), cb, scb)
    name = f"kInt8RowQuant<{ELEMENT_TYPES[rows.dtype]}>"
    launch(device, "int8_rowwise.cu", name, nrows, (*args, NULL if col_flags is None else col_flags))


def int8_row_dequant(cb: torch.Tensor, scb: torch.Tensor, cols: int, out: torch.Tensor) -> None:
    """kInt8RowDequant: out = (CB * SCB[row]) * (1/127) in float32."""
    device = on_gpu(cb)
    n = cb.numel()
    check(cb, "CB", torch.int8, device)
    check(scb, "SCB", torch.float32, device, n // cols)
    check(out, "output", torch.float32, device, n)
    if cb.data_ptr() % 16 or out.data_ptr() % 16 or n % cols:
        raise InternalError("kInt8RowDequant: CB and the output must be 16-byte aligned whole rows")
    grid = -(-n // (THREADS * 16))
    launch(device, "int8_rowwise.cu", "kInt8RowDequant", grid, (cb, scb, np.int64(n), np.int32(cols), out))


def code_map_for(device: torch.device, encoder: str) -> torch.Tensor:
    """Room for a record's own code map, which the quantize kernel fills (records must not share
    storage: safetensors refuses it)."""
    return torch.empty(device_tables(device)[ENCODER_MAPS[encoder]].numel(), dtype=torch.float32, device=device)
