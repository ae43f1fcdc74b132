"""Blockwise 8-bit quantization with the signed dynamic map (bitsandbytes ``quantize_blockwise``).

Also the second level of 4-bit double quantization, which re-quantizes the 4-bit absmax this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from bnbcli.errors import UsageError
from bnbcli.formats.blocks import CodeTable, encode, expand_blocks, quantize_blocks
from bnbcli.formats.codes import DYNAMIC_CODE
from bnbcli.formats.cuda_mean import cuda_mean_f32
from bnbcli.formats.gpu_math import gpu_cast
from bnbcli.formats.layout import BLOCKWISE8_BLOCKSIZES


@lru_cache(maxsize=1)
def dynamic_thresholds() -> torch.Tensor:
    """Thresholds that make ``encode`` equal to the kernel's 7-step binary search ``dQuantize<0>``.

    The search compares only odd-indexed codes and ends on an even pivot p, then picks p+1 if
    x > mid(p, p+1) (a tie stays at p) or p-1 if x < mid(p-1, p) (a tie stays at p). Between codes
    k and k+1 the boundary is therefore the float32 midpoint ``(code[k] + code[k+1]) * 0.5f``, passed
    strictly for even k and inclusively for odd k. Inclusive "x >= m" is "x > nextafter(m, -inf)".
    """
    code = DYNAMIC_CODE
    mids = ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)
    odd = np.arange(mids.size) % 2 == 1
    mids[odd] = np.nextafter(mids[odd], np.float32(-np.inf))
    assert np.all(np.diff(mids) > 0), "dynamic-map thresholds must increase"
    return torch.from_numpy(mids)


@dataclass(frozen=True)
class Blockwise8Quantized:
    """The dynamic-map 8-bit form of a tensor: ``q`` has the input's shape.

    With ``nested``, ``absmax`` holds uint8 codes of (absmax - nested_offset), quantized again with
    the same blocksize into ``nested_absmax`` (bitsandbytes ``quantize_blockwise(nested=True)``).
    """

    q: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_offset: float | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def check_blocksize(blocksize: int) -> None:
    """The blocksizes blockwise 8-bit supports (the CUDA backend checks the same)."""
    if blocksize not in BLOCKWISE8_BLOCKSIZES:
        raise UsageError(
            f"blocksize {blocksize} is not supported for blockwise 8-bit",
            hint=f"use one of {', '.join(map(str, BLOCKWISE8_BLOCKSIZES))}",
        )


def _encode_dynamic(scaled: torch.Tensor) -> torch.Tensor:
    return encode(scaled, dynamic_thresholds())


@lru_cache(maxsize=1)
def code_table() -> CodeTable:
    return CodeTable.build(_encode_dynamic)


def quantize_codes(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes (flat) and float32 absmax of x, as ``kQuantizeBlockwise<General8bit>`` makes them."""
    return quantize_blocks(x, blocksize, code_table())


def quantize_blockwise8(x: torch.Tensor, blocksize: int = 4096, nested: bool = False) -> Blockwise8Quantized:
    """bitsandbytes ``functional.quantize_blockwise(x, blocksize=..., nested=...)`` with the CUDA bytes."""
    check_blocksize(blocksize)
    codes, absmax = quantize_codes(x, blocksize)
    code = torch.from_numpy(DYNAMIC_CODE.copy())
    q = codes.reshape(x.shape)
    if not nested:
        return Blockwise8Quantized(q=q, absmax=absmax, code=code, blocksize=blocksize, dtype=x.dtype)
    offset = cuda_mean_f32(absmax.numpy())
    centered = absmax - torch.tensor(offset, dtype=torch.float32)
    nested_codes, nested_absmax = quantize_codes(centered, blocksize)
    return Blockwise8Quantized(
        q=q,
        absmax=nested_codes,
        code=code,
        blocksize=blocksize,
        dtype=x.dtype,
        nested_absmax=nested_absmax,
        nested_offset=float(offset),
    )


def dequantize_codes(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, code: torch.Tensor) -> torch.Tensor:
    """float32 code[q] * absmax[i // blocksize] (``kDequantizeBlockwise<General8bit>`` before the cast)."""
    return expand_blocks(code[codes.reshape(-1).long()], absmax, blocksize)


def dequantize_blockwise8(q: Blockwise8Quantized) -> torch.Tensor:
    """bitsandbytes ``functional.dequantize_blockwise``: the tensor in its original dtype and shape."""
    absmax = q.absmax
    if q.nested_absmax is not None:
        # Dequantize the absmax codes (float32), then a separate float32 add of the offset.
        absmax = dequantize_codes(q.absmax, q.nested_absmax, q.blocksize, q.code)
        absmax = absmax + torch.tensor(q.nested_offset, dtype=torch.float32)
    values = dequantize_codes(q.q, absmax, q.blocksize, q.code)
    return gpu_cast(values, q.dtype).reshape(q.q.shape)
