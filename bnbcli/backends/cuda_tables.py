"""The lookup tables the CUDA kernels encode with, built from the CPU reference's thresholds.

Pure numpy (no CuPy): the tables are checked on any machine, and ``emulate_*`` replay the kernels'
integer and float steps bit for bit so tests can compare them with the reference encoders on every
float32 that matters (tests/unit/test_cuda_tables.py). See cuda_kernels/quantize_blockwise.cu for the
kernel side of each table.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from bnbcli.formats import blockwise8, fourbit
from bnbcli.formats.codes import FP4_MAGNITUDE_BITS, FP4_THRESHOLDS, NF4_THRESHOLDS

# --------------------------------------------------------------------------------------------------
# 4-bit: 31 buckets of width 1/15 over the scaled value, one per lane of a warp (LaneLut in the .cu).

BUCKET_MAGIC = 12582912.0  # 1.5 * 2^23: adding it leaves the rounded integer in the low mantissa bits
BUCKET_MAGIC_BITS = 0x4B400000
NAN_BUCKET = 31
# |s| <= 1 + 3e-7 for s = x * rcp.approx(absmax) with |x| <= absmax (rcp.approx is within 1 ulp).
SCALED_LIMIT = 1.0 + 3e-7
_EDGE = 1e-6  # a bucket's range is widened by this much each way before checking it


def _bucket_bias(quant_type: str) -> float:
    """NF4 buckets the signed value (bias 15: -1 -> 0, 1 -> 30); FP4 buckets |value| (0 -> 0, 1 -> 15)."""
    return 15.0 if quant_type == "nf4" else 0.0


def _interval_codes(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, code of each interval): interval i lies between thresholds i-1 and i."""
    if quant_type == "nf4":
        return NF4_THRESHOLDS, np.arange(16, dtype=np.uint32)
    return FP4_THRESHOLDS, FP4_MAGNITUDE_BITS.astype(np.uint32)


@cache
def lane_lut(quant_type: str) -> np.ndarray:
    """uint32[64]: [k] = code below | code above << 4 of bucket k's threshold, [32 + k] = its float32 bits.

    Bucket k holds the keys with round(key * 15 + bias) == k, i.e. key in [(k - bias - 0.5) / 15,
    (k - bias + 0.5) / 15]. Each such range is narrower than the gap between any two thresholds, so it
    holds at most one (asserted): its keys get the code of interval lo, or lo + 1 above threshold lo.
    Bucket 31 is where every NaN lands: code 0 whatever the comparison says.
    """
    thresholds, codes = _interval_codes(quant_type)
    bias = _bucket_bias(quant_type)
    low_key = -SCALED_LIMIT if quant_type == "nf4" else 0.0
    table = np.zeros(64, dtype=np.uint32)
    for k in range(31):
        lo_key = max((k - bias - 0.5) / 15 - _EDGE, low_key)
        hi_key = min((k - bias + 0.5) / 15 + _EDGE, SCALED_LIMIT)
        if lo_key > hi_key:  # FP4 uses buckets 0 ... 15 only
            continue
        lo = int(np.searchsorted(thresholds, np.float32(lo_key), side="left"))
        hi = int(np.searchsorted(thresholds, np.float32(hi_key), side="left"))
        assert hi - lo <= 1, f"{quant_type} bucket {k} holds two thresholds"
        above = min(lo + 1, len(codes) - 1)
        threshold = thresholds[lo] if lo < len(thresholds) else np.float32(np.inf)
        table[k] = codes[lo] | (codes[above] << 4)
        table[32 + k] = np.float32(threshold).view(np.uint32)
    table[NAN_BUCKET] = 0
    table[32 + NAN_BUCKET] = 0
    return table


def emulate_lane_lut(scaled: np.ndarray, quant_type: str) -> np.ndarray:
    """uint8 codes as kQuantizeBlockwise<.., Nf4|Fp4> computes them from float32 ``scaled`` values
    (products of the ftz multiply: no subnormals), bit for bit."""
    s = np.asarray(scaled, dtype=np.float32)
    key = np.abs(s) if quant_type == "fp4" else s
    # fma(key, 15, magic + bias): key * 15 and the sum are exact in float64 (see lane_lut), so the
    # float32 conversion is the fma's one rounding.
    with np.errstate(invalid="ignore"):
        total = (key.astype(np.float64) * 15.0 + (BUCKET_MAGIC + _bucket_bias(quant_type))).astype(np.float32)
    bucket = np.minimum(total.view(np.uint32) - np.uint32(BUCKET_MAGIC_BITS), np.uint32(NAN_BUCKET))
    table = lane_lut(quant_type)
    packed = table[bucket]
    threshold = table[32 + bucket].view(np.float32)
    with np.errstate(invalid="ignore"):
        above = key > threshold
    codes = np.where(above, packed >> 4, packed) & 15
    if quant_type == "fp4":
        codes = codes | np.where(s < 0, 8, 0).astype(np.uint32)
    return codes.astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# 8-bit dynamic map: the reference's CodeTable offsets for the high-16-bit buckets 0x3400 ... 0x3F80
# of each sign (Dyn8 in the .cu).

DYN8_LOW_BUCKET = 0x3400  # 2^-23: below it (and below 2.7e-7) every value has code 127
DYN8_HIGH_BUCKET = 0x3F80  # 1.0
DYN8_NEGATIVE = DYN8_HIGH_BUCKET - DYN8_LOW_BUCKET + 1  # 0xB81: where the negative buckets start
DYN8_TABLE_ENTRIES = 2 * DYN8_NEGATIVE


@cache
def dynamic_table() -> np.ndarray:
    """uint32[0x1702]: CodeTable offsets, positive buckets at 0 ..., negative ones at 0xB81 ..."""
    offset = blockwise8.code_table().offset.numpy().view(np.uint32)
    assert blockwise8.code_table().codes is None, "the dynamic map's intervals are its codes"
    table = np.zeros(DYN8_TABLE_ENTRIES, dtype=np.uint32)
    span = np.arange(DYN8_HIGH_BUCKET - DYN8_LOW_BUCKET + 1)
    table[span] = offset[DYN8_LOW_BUCKET + span]
    table[DYN8_NEGATIVE + span] = offset[0x8000 + DYN8_LOW_BUCKET + span]
    return table


def emulate_dynamic(scaled: np.ndarray) -> np.ndarray:
    """uint8 codes as kQuantizeBlockwise<.., Dyn8> computes them from float32 ``scaled``, bit for bit."""
    s = np.asarray(scaled, dtype=np.float32)
    nan = np.isnan(s)
    a = np.clip(np.abs(np.where(nan, np.float32(0), s)), np.float32(2.0**-23), np.float32(1.0)).view(np.uint32)
    negative = (s.view(np.int32) >> 31).view(np.uint32)  # all ones for a set sign bit
    v = a ^ (negative & np.uint32(0x7FFFFFFF))
    index = (a >> np.uint32(16)) - np.uint32(DYN8_LOW_BUCKET) + (negative & np.uint32(DYN8_NEGATIVE))
    code = ((dynamic_table()[index] + v) >> np.uint32(16)) & np.uint32(0xFF)
    return np.where(nan, 0, code).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Tables handed to the kernels as they are


def dequant_lut(quant_type: str) -> torch.Tensor:
    """float32[16]: what kDequantizeBlockwise multiplies (FP4 code 8 is -0.0, unlike quant_map)."""
    return fourbit.code_tables(quant_type)[1].clone()


def quant_map(quant_type: str) -> torch.Tensor:
    """float32[16]: the ``quant_map`` a QuantState stores."""
    return fourbit.code_tables(quant_type)[0].clone()
