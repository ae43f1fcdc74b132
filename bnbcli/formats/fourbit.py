"""4-bit NF4/FP4 blockwise quantization (bitsandbytes ``quantize_4bit`` / ``dequantize_4bit``).

Bytes are those of the CUDA kernel ``kQuantizeBlockwise<T, B, N, 0, NF4|FP4>`` and of
``kDequantizeBlockwise``; the record knows the state-dict keys that ``Linear4bit`` saves and
transformers loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from bnbcli.errors import InputError, UsageError
from bnbcli.formats import blockwise8
from bnbcli.formats.blocks import CodeTable, encode, expand_blocks, quantize_blocks, unpack_nibbles_into
from bnbcli.formats.codes import (
    DYNAMIC_CODE,
    FLT_MAX,
    FLT_MIN,
    FP4_CODE,
    FP4_MAGNITUDE_BITS,
    FP4_SIGN_BIT,
    FP4_THRESHOLDS,
    NF4_CODE,
    NF4_THRESHOLDS,
)
from bnbcli.formats.cuda_mean import cuda_mean_f32
from bnbcli.formats.dtypes import dtype_name, is_float
from bnbcli.formats.gpu_math import gpu_cast
from bnbcli.formats.layout import FOUR_BIT_BLOCKSIZES, NESTED_BLOCKSIZE, num_blocks
from bnbcli.formats.metrics import Restore

QUANT_TYPES = ("nf4", "fp4")


@cache
def code_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quant_map as stored, LUT the CUDA dequantizer really uses)."""
    if quant_type == "nf4":
        return torch.from_numpy(NF4_CODE.copy()), torch.from_numpy(NF4_CODE.copy())
    lut = FP4_CODE.copy()
    # dDequantizeFP4Tree multiplies a magnitude by the sign (1 - 2*bit3): code 8 decodes to -0.0,
    # although the stored quant_map[8] is +0.0.
    lut[8] = -0.0
    return torch.from_numpy(FP4_CODE.copy()), torch.from_numpy(lut)


@dataclass(frozen=True)
class QuantState4bit:
    """A 4-bit quantized tensor with everything bitsandbytes' ``QuantState`` serializes.

    ``packed`` is [(n+1)//2, 1] uint8 (or those bytes viewed as ``quant_storage``). Without double
    quantization ``absmax`` is float32 [nb]; with it, ``absmax`` is the uint8 codes of
    (absmax - nested_offset) and ``nested_absmax``/``nested_quant_map`` hold the second level.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def quant_storage(self) -> torch.dtype:
        return self.packed.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def quant_state_json(self) -> str:
        """The string ``QuantState.as_dict(packed=True)`` packs: json.dumps with default separators."""
        state: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        if self.double_quant:
            state["nested_blocksize"] = NESTED_BLOCKSIZE
            state["nested_dtype"] = "float32"
            state["nested_offset"] = self.nested_offset
        return json.dumps(state)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors ``Linear4bit`` saves for a weight named ``prefix`` (e.g. "model.layers.0.q.weight"),
        in bitsandbytes' order. Each is its own buffer: safetensors refuses shared storage."""
        entries = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.quant_map,
        }
        if self.double_quant:
            assert self.nested_absmax is not None and self.nested_quant_map is not None
            entries[f"{prefix}.nested_absmax"] = self.nested_absmax
            entries[f"{prefix}.nested_quant_map"] = self.nested_quant_map
        key, value = self.quant_state_entry(prefix)
        entries[key] = value
        return entries

    def quant_state_entry(self, prefix: str) -> tuple[str, torch.Tensor]:
        """The last state-dict entry: the packed quant_state JSON as uint8 bytes, under its key."""
        json_bytes = np.frombuffer(self.quant_state_json().encode("utf-8"), dtype=np.uint8)
        return f"{prefix}.quant_state.bitsandbytes__{self.quant_type}", torch.from_numpy(json_bytes.copy())


def check_quantize_args(x: torch.Tensor, quant_type: str, blocksize: int, quant_storage: torch.dtype) -> None:
    """What ``quantize_4bit`` accepts (the CUDA backend checks the same before its kernels run)."""
    if quant_type not in QUANT_TYPES:
        raise UsageError(f"unknown 4-bit quant_type {quant_type!r}", hint="use 'nf4' or 'fp4'")
    if blocksize not in FOUR_BIT_BLOCKSIZES:
        raise UsageError(
            f"blocksize {blocksize} is not supported for 4-bit",
            hint=f"use one of {', '.join(map(str, FOUR_BIT_BLOCKSIZES))}",
        )
    if not is_float(x.dtype):
        raise UsageError(f"cannot quantize a {dtype_name(x.dtype)} tensor", hint="give fp16, bf16 or fp32")
    if quant_storage.is_complex:
        raise UsageError(f"quant_storage {quant_storage} is not a real dtype", hint="use torch.uint8 (the default)")
    if x.numel() == 0:
        raise UsageError("cannot quantize an empty tensor", hint="give a tensor with elements")


def _encode_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """dQuantizeNF4: a decision tree on strict ``x > threshold`` tests, i.e. a count of thresholds below."""
    return encode(scaled, torch.from_numpy(NF4_THRESHOLDS))


def _encode_fp4(scaled: torch.Tensor) -> torch.Tensor:
    """dQuantizeFP4: sign from x < 0 *after* the ftz multiply, so a product that underflows to a
    subnormal is -0.0 and keeps sign 0; then a monotone tree on |x|. NaN fails every test -> 0."""
    magnitude = torch.from_numpy(FP4_MAGNITUDE_BITS)[encode(scaled.abs(), torch.from_numpy(FP4_THRESHOLDS)).long()]
    sign = (scaled <= -FLT_MIN).to(torch.uint8) * FP4_SIGN_BIT
    return (magnitude | sign).masked_fill_(torch.isnan(scaled), 0)


@cache
def code_table(quant_type: str) -> CodeTable:
    return CodeTable.build(_encode_nf4 if quant_type == "nf4" else _encode_fp4)


def as_storage(packed: torch.Tensor, quant_storage: torch.dtype) -> torch.Tensor:
    """bitsandbytes allocates [(n+1) // (2*itemsize), 1] elements of quant_storage; a trailing byte
    that does not fill a whole element is dropped, as there."""
    itemsize = quant_storage.itemsize
    usable = packed[: (packed.numel() // itemsize) * itemsize].contiguous()
    return usable.view(quant_storage).reshape(-1, 1)


def quantize_4bit(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> QuantState4bit:
    """bitsandbytes ``functional.quantize_4bit(x, blocksize, compress_statistics=double_quant, quant_type,
    quant_storage)`` with the bytes of its CUDA kernel."""
    check_quantize_args(x, quant_type, blocksize, quant_storage)
    packed, absmax = quantize_blocks(x, blocksize, code_table(quant_type), pack=True)
    return make_record(packed, absmax, tuple(x.shape), x.dtype, quant_type, blocksize, double_quant, quant_storage)


def make_record(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    quant_storage: torch.dtype,
) -> QuantState4bit:
    """The record of one tensor's packed codes and float32 absmax (double-quantized if asked)."""
    quant_map, _ = code_tables(quant_type)
    common = dict(
        packed=as_storage(packed, quant_storage),
        quant_map=quant_map.clone(),
        blocksize=blocksize,
        shape=shape,
        dtype=dtype,
        quant_type=quant_type,
    )
    if not double_quant:
        return QuantState4bit(absmax=absmax, **common)  # type: ignore[arg-type]
    # Double quantization: centre the absmax on its mean (torch's CUDA mean, bit for bit), then
    # quantize it with the dynamic map in blocks of 256.
    offset = cuda_mean_f32(absmax.numpy())
    centered = absmax - torch.tensor(offset, dtype=torch.float32)
    nested_codes, nested_absmax = blockwise8.quantize_codes(centered, NESTED_BLOCKSIZE)
    return QuantState4bit(
        absmax=nested_codes,
        nested_absmax=nested_absmax,
        nested_quant_map=torch.from_numpy(DYNAMIC_CODE.copy()),
        nested_offset=float(offset),
        **common,  # type: ignore[arg-type]
    )


def block_scales(q: QuantState4bit) -> torch.Tensor:
    """float32 [nb] absmax per block, rebuilt as ``dequantize_4bit`` does for double quantization:
    8-bit dequant (one rounding), then a separate float32 add of the offset (a second rounding)."""
    if q.nested_absmax is None:
        return q.absmax
    assert q.nested_quant_map is not None and q.nested_offset is not None
    scales = blockwise8.dequantize_codes(q.absmax, q.nested_absmax, NESTED_BLOCKSIZE, q.nested_quant_map)
    return scales + torch.tensor(q.nested_offset, dtype=torch.float32)


def packed_bytes(q: QuantState4bit) -> torch.Tensor:
    """The (n+1)//2 packed uint8 bytes of ``q``, checked against its shape and block count (both
    backends' ``dequantize_4bit`` read them so). A 2- or 4-byte quant_storage may have dropped the last
    partial element's bytes (see as_storage): they come back as zeros."""
    n = q.numel
    packed = q.packed.contiguous().view(torch.uint8).reshape(-1)
    needed = (n + 1) // 2
    if not 0 <= needed - packed.numel() < q.packed.element_size() or num_blocks(n, q.blocksize) != q.absmax.numel():
        raise InputError(
            f"4-bit state does not fit shape {list(q.shape)}", hint="the checkpoint is inconsistent; export it again"
        )
    if packed.numel() < needed:
        packed = torch.cat((packed, packed.new_zeros(needed - packed.numel())))
    return packed


def dequantize_4bit(q: QuantState4bit) -> torch.Tensor:
    """bitsandbytes ``functional.dequantize_4bit``: float32 LUT[code] * absmax, one rounding to ``dtype``."""
    values = dequantize_packed(packed_bytes(q), block_scales(q), q.numel, q.quant_type, q.blocksize, q.dtype)
    return values.reshape(q.shape)


def restorer(q: QuantState4bit) -> Restore:
    """``dequantize_4bit(q)``'s values, widened to float32, a range of elements at a time (the CPU
    round-trip error reads a weight in cache-sized blocks, and its threads ask for their own blocks:
    the whole dequantized weight is never made). A range starts at a multiple of the blocksize."""
    packed, scales = packed_bytes(q), block_scales(q)
    table = _value_table(scales, q.quant_type, q.dtype).to(torch.float32).reshape(-1)
    blocksize, n = q.blocksize, q.numel

    def restore(start: int, stop: int, out: torch.Tensor) -> None:
        assert start % blocksize == 0 and 0 <= start < stop <= n
        where = _table_positions(packed[start // 2 : (stop + 1) // 2], start // blocksize, stop - start, blocksize)
        torch.index_select(table, 0, where, out=out)

    return restore


_CODES = 16  # values a 4-bit code can take


def _table_positions(packed: torch.Tensor, first_block: int, m: int, blocksize: int) -> torch.Tensor:
    """int32 [m]: where each of the m codes in ``packed`` (two per byte, from the start of block
    ``first_block``) finds its value in a flat table of 16 values per block, 16 * block + code.
    int32, as index_select takes it as it is (int64 cost a pass more)."""
    rows = -(-m // blocksize)
    where = torch.empty(rows * blocksize, dtype=torch.int32)  # past the last code: unset, never looked up
    unpack_nibbles_into(packed, where)
    blocks = torch.arange(first_block * _CODES, (first_block + rows) * _CODES, _CODES, dtype=torch.int32)
    return where.view(rows, blocksize).add_(blocks[:, None]).view(-1)[:m]


def _value_table(scales: torch.Tensor, quant_type: str, dtype: torch.dtype) -> torch.Tensor:
    """[blocks, 16]: each block's 16 possible values in ``dtype`` (LUT * scale with the kernel's ftz
    multiply, one rounding), which its codes look up."""
    _, lut = code_tables(quant_type)
    if _products_are_normal(scales, lut):  # then ftz and the NaN patterns change nothing: one multiply, one cast
        return (lut * scales[:, None]).to(dtype)
    return gpu_cast(expand_blocks(lut.repeat(scales.numel()), scales, _CODES), dtype).view(-1, _CODES)


def _products_are_normal(scales: torch.Tensor, lut: torch.Tensor) -> bool:
    """Whether every product of a scale and a code value is zero or a finite normal float32: finite scales
    at least twice as large as the smallest normal divided by the smallest nonzero |code value| (every
    real weight's; the rest take the kernel's whole rule)."""
    smallest = float(lut.abs()[lut != 0].min())
    magnitude = scales.abs()
    return bool(((magnitude >= 2 * float(FLT_MIN) / smallest) & (magnitude <= float(FLT_MAX))).all())


def dequantize_packed(
    packed: torch.Tensor, scales: torch.Tensor, n: int, quant_type: str, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """The n values [n] of packed bytes with float32 ``scales`` per block, in ``dtype``.

    A value depends on its 4-bit code and its block's scale alone, so each block's 16 possible values
    are computed first (LUT * scale with the kernel's ftz multiply, cast to ``dtype``) and every code
    looks its value up: the same bits as multiplying value by value, at a third of the time for a
    large weight (`bnb dequantize` and `bnb inspect` dequantize every weight; the CPU round trip of `bnb
    quantize` looks its values up in the same table, a block at a time: ``restorer``)."""
    table = _value_table(scales, quant_type, dtype)
    return table.reshape(-1).index_select(0, _table_positions(packed.reshape(-1)[: (n + 1) // 2], 0, n, blocksize))
