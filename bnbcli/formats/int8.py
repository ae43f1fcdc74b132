"""LLM.int8() row-wise int8 (bitsandbytes ``int8_vectorwise_quant`` / ``int8_vectorwise_dequant``).

Weights follow ``Int8Params._quantize``: cast to float16 first (round to nearest even; |x| >= 65520
becomes inf), then the CUDA kernel ``kInt8VectorQuant`` quantizes each row with its own absmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bnbcli.errors import UsageError
from bnbcli.formats import blocks, parts
from bnbcli.formats.codes import INT8_INV_127, INT8_SCALE_NUMERATOR
from bnbcli.formats.dtypes import dtype_name, is_float
from bnbcli.formats.gpu_math import gpu_nan, rcp_approx

WEIGHT_FORMAT_ROW = 0  # the `weight_format` entry (bitsandbytes/utils.py): row = 0, the only layout transformers writes


@dataclass(frozen=True)
class Int8Rowwise:
    """``CB`` int8 with the input's shape, ``SCB`` float32 [rows] (the fp16 row absmax), and with a
    threshold > 0 the int64 indices of the columns that held outliers (None without a threshold)."""

    CB: torch.Tensor
    SCB: torch.Tensor
    outlier_cols: torch.Tensor | None = None


def quantize_int8_rowwise(x: torch.Tensor, threshold: float = 0.0) -> Int8Rowwise:
    """LLM.int8 row-wise quantization of a weight, as transformers stores it (``Int8Params``)."""
    if not is_float(x.dtype):
        raise UsageError(f"cannot quantize a {dtype_name(x.dtype)} tensor", hint="give fp16, bf16 or fp32")
    if x.numel() == 0:
        raise UsageError("cannot quantize an empty tensor", hint="give a tensor with elements")
    if threshold > 0.0 or x.dim() == 0:
        return reference_quantize_int8_rowwise(x, threshold)
    return _quantize_int8_rows(x)


def reference_quantize_int8_rowwise(x: torch.Tensor, threshold: float = 0.0) -> Int8Rowwise:
    """The kernel's arithmetic as whole-tensor torch expressions: the specification."""
    half = x.to(torch.float16)
    rows = half.reshape(-1, half.shape[-1]) if half.dim() > 0 else half.reshape(1, 1)
    values = rows.to(torch.float32)
    magnitude = values.abs()

    outlier_cols = None
    counted = ~torch.isnan(magnitude)  # the kernel reduces with fmaxf: NaN never wins
    if threshold > 0.0:
        # Outliers (|x| >= threshold) leave the row absmax and are stored as 0.
        outliers = magnitude >= threshold
        outlier_cols = torch.nonzero(outliers.any(dim=0)).reshape(-1)
        counted &= ~outliers
        values = values.masked_fill(outliers, 0.0)

    # The row max runs in half precision (exact) from a start of -0.0 (-FLT_MIN cast to half), so a
    # row with nothing counted keeps SCB = -0.0; an fp16 overflow (|x| >= 65520) gives SCB = inf.
    scb = torch.where(counted, magnitude, 0.0).amax(dim=1)
    scb = torch.where(counted.any(dim=1), scb, -0.0)
    # __fdividef(127.0f, absmax) == fl32(127 * rcp.approx(absmax)); a zero row gives inf, and
    # 0 * inf = NaN, which __float2int_rn turns into 0.
    scale = INT8_SCALE_NUMERATOR * rcp_approx(scb)
    scaled = values * scale[:, None]
    # __float2int_rn: round half to even; NaN becomes 0.
    cb = torch.nan_to_num(torch.round(scaled), nan=0.0).to(torch.int8)
    if outlier_cols is not None and rows.shape[0] > 1:
        cb[:, outlier_cols] = 0
    return Int8Rowwise(CB=cb.reshape(x.shape), SCB=scb, outlier_cols=outlier_cols)


def _quantize_int8_rows(x: torch.Tensor) -> Int8Rowwise:
    """``reference_quantize_int8_rowwise(x)`` (no threshold) byte for byte, in cache-sized chunks of rows.

    Takes the reference's arithmetic for granted on ordinary rows (finite, not all zero), where every
    scaled value is finite and within [-127, 127]; other rows go through the reference.
    """
    rows = x.reshape(-1, x.shape[-1])
    nrows, ncols = rows.shape
    cb = torch.empty(nrows, ncols, dtype=torch.int8)
    scb = torch.empty(nrows, dtype=torch.float32)
    step = max(1, blocks.CHUNK_ELEMENTS // ncols)

    def some_rows(start: int, stop: int) -> None:
        _quantize_ordinary_rows(rows[start:stop], cb[start:stop], scb[start:stop], step)

    parts.for_each_part(some_rows, nrows, step)

    unusual = torch.nonzero(~((scb > 0) & (scb <= torch.finfo(torch.float16).max))).reshape(-1)
    if unusual.numel():
        redo = reference_quantize_int8_rowwise(rows[unusual])
        cb[unusual] = redo.CB
        scb[unusual] = redo.SCB
    return Int8Rowwise(CB=cb.reshape(x.shape), SCB=scb)


def _quantize_ordinary_rows(rows: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, step: int) -> None:
    """``rows`` [r, c] into ``cb`` [r, c] and ``scb`` [r], ``step`` rows at a time, assuming every row is
    ordinary; the caller redoes the others."""
    nrows, ncols = rows.shape
    chunk_shape = (min(step, nrows), ncols)
    bits_dtype, mask, _ = blocks.BITS[rows.dtype]
    magnitude = torch.empty(chunk_shape, dtype=bits_dtype)
    max_bits = torch.empty(nrows, dtype=bits_dtype)
    # Row absmax on the input's bits without the sign: they order like the magnitudes (NaN above inf).
    for r0 in range(0, nrows, step):
        k = min(step, nrows - r0)
        m = torch.bitwise_and(rows[r0 : r0 + k].view(bits_dtype), mask, out=magnitude[:k])
        torch.amax(m, dim=1, out=max_bits[r0 : r0 + k])
    # The reference takes the absmax of the fp16 values; rounding to fp16 keeps the order of values, so
    # that is the input's absmax rounded to fp16.
    scb[:] = max_bits.view(rows.dtype).to(torch.float16).to(torch.float32)
    scale = INT8_SCALE_NUMERATOR * rcp_approx(scb)

    half = torch.empty(chunk_shape, dtype=torch.float16)
    scaled = torch.empty(chunk_shape, dtype=torch.float32)
    for r0 in range(0, nrows, step):
        k = min(step, nrows - r0)
        chunk = rows[r0 : r0 + k]
        # bf16 goes to fp16 through float32, which holds it exactly: the same bits as torch's direct cast,
        # whose bf16 -> fp16 loop took 60 % of this function (tests/unit/test_fast_paths.py: all 65,536)
        wide = scaled[:k].copy_(chunk) if rows.dtype == torch.bfloat16 else chunk
        h = chunk if rows.dtype == torch.float16 else half[:k].copy_(wide)
        # fp16 widens exactly, so this is the reference's float32 multiply; then round half to even.
        s = scaled[:k].copy_(h).mul_(scale[r0 : r0 + k, None]).round_()
        cb[r0 : r0 + k].copy_(s)  # whole numbers in [-127, 127] on ordinary rows


def dequantize_int8_rowwise(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """float32 (q * SCB[row]) * float32(1/127): a multiply then a multiply, not q * SCB / 127."""
    out = CB.reshape(-1, CB.shape[-1]).to(torch.float32)  # a new tensor: the multiplies run in place
    out.mul_(SCB.reshape(-1, 1)).mul_(torch.tensor(INT8_INV_127, dtype=torch.float32))
    if bool(torch.isfinite(SCB).all()):  # codes are whole numbers: only a NaN or Inf scale makes a NaN
        return out.reshape(CB.shape)
    return gpu_nan(out).reshape(CB.shape)
