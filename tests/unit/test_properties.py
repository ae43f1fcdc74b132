"""Properties over random shapes, dtypes and blocksizes: round trips within each format's worst-case
step, nibble packing is invertible, and special values (zeros, constants, ±inf, NaN, subnormals) give
bitsandbytes' documented results rather than a crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bnbcli
from bnbcli.formats.blocks import pack_nibbles, unpack_nibbles
from bnbcli.formats.codes import (
    DYNAMIC_CODE,
    FP4_CODE,
    FP4_MAGNITUDE_BITS,
    FP4_THRESHOLDS,
    NF4_CODE,
    NF4_THRESHOLDS,
)
from bnbcli.formats.layout import BLOCKWISE8_BLOCKSIZES, FOUR_BIT_BLOCKSIZES

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Relative rounding of one conversion to the output dtype.
OUTPUT_EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}


def worst_step(code: np.ndarray, thresholds: np.ndarray) -> float:
    """The largest distance (in units of absmax) between a normalized value and the code it gets."""
    below = thresholds - code[:-1]
    above = code[1:] - thresholds
    return float(max(below.max(), above.max()))


NF4_WORST = worst_step(NF4_CODE, NF4_THRESHOLDS)
FP4_WORST = worst_step(FP4_CODE[FP4_MAGNITUDE_BITS], FP4_THRESHOLDS)
DYNAMIC_WORST = float(np.max(np.diff(DYNAMIC_CODE)) / 2)


@st.composite
def tensors(draw: st.DrawFn, max_numel: int = 6000) -> torch.Tensor:
    ndim = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 40 if ndim > 1 else max_numel)) for _ in range(ndim)]
    while int(np.prod(shape)) > max_numel:
        shape[int(np.argmax(shape))] //= 2
    dtype = draw(st.sampled_from(DTYPES))
    scale = 10.0 ** draw(st.integers(-3, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).standard_t(df=4, size=shape) * scale
    return torch.from_numpy(values.astype(np.float32)).to(dtype)


def block_view(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    return torch.cat((flat, flat.new_zeros(pad))).view(-1, blocksize)


@settings(max_examples=60, deadline=None)
@given(
    x=tensors(),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    blocksize=st.sampled_from(FOUR_BIT_BLOCKSIZES),
    double_quant=st.booleans(),
)
def test_4bit_round_trip_within_worst_step(
    x: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> None:
    q = bnbcli.quantize_4bit(x, quant_type, blocksize, double_quant)
    y = bnbcli.dequantize_4bit(q)
    assert y.dtype == x.dtype and y.shape == x.shape
    true_absmax = block_view(x, blocksize).abs().amax(dim=1)
    from bnbcli.formats.fourbit import block_scales

    used = block_scales(q)
    worst = NF4_WORST if quant_type == "nf4" else FP4_WORST
    # |x - LUT*s'| <= s*worst + |s - s'| (the LUT is within [-1, 1]), plus the output rounding.
    bound_per_block = true_absmax * worst * (1 + 2**-20) + (true_absmax - used).abs() + 1e-30
    bound = bound_per_block.repeat_interleave(blocksize)[: x.numel()].view(x.shape)
    err = (x.float() - y.float()).abs()
    assert bool((err <= bound + y.float().abs() * OUTPUT_EPS[x.dtype]).all())


@settings(max_examples=40, deadline=None)
@given(x=tensors(), blocksize=st.sampled_from(BLOCKWISE8_BLOCKSIZES), nested=st.booleans())
def test_blockwise8_round_trip_within_worst_step(x: torch.Tensor, blocksize: int, nested: bool) -> None:
    q = bnbcli.quantize_blockwise8(x, blocksize, nested)
    y = bnbcli.dequantize_blockwise8(q)
    assert y.dtype == x.dtype and y.shape == x.shape and q.q.shape == x.shape
    true_absmax = block_view(x, blocksize).abs().amax(dim=1)
    used = true_absmax
    if nested:
        from bnbcli.formats.blockwise8 import dequantize_codes

        used = dequantize_codes(q.absmax, q.nested_absmax, q.blocksize, q.code) + q.nested_offset
    bound_per_block = true_absmax * DYNAMIC_WORST * (1 + 2**-20) + (true_absmax - used).abs() + 1e-30
    bound = bound_per_block.repeat_interleave(blocksize)[: x.numel()].view(x.shape)
    err = (x.float() - y.float()).abs()
    assert bool((err <= bound + y.float().abs() * OUTPUT_EPS[x.dtype]).all())


@settings(max_examples=40, deadline=None)
@given(x=tensors())
def test_int8_round_trip_within_half_step(x: torch.Tensor) -> None:
    q = bnbcli.quantize_int8_rowwise(x)
    assert q.CB.dtype == torch.int8 and q.CB.shape == x.shape
    y = bnbcli.dequantize_int8_rowwise(q.CB, q.SCB)
    rows = x.to(torch.float16).float().reshape(-1, x.shape[-1])
    assert torch.equal(q.SCB, rows.abs().amax(dim=1)), "SCB is the fp16 row absmax"
    half_step = (q.SCB / 127 * 0.5 * (1 + 1e-5) + q.SCB * 1e-7)[:, None]
    err = (rows - y.reshape(rows.shape)).abs()
    worst = int(torch.argmax(err - half_step))
    r, c = divmod(worst, rows.shape[1])
    assert bool((err <= half_step).all()), (rows[r, c].item(), q.CB.reshape(rows.shape)[r, c].item(), q.SCB[r].item())


@given(data=st.binary(min_size=1, max_size=512))
def test_nibble_packing_is_invertible(data: bytes) -> None:
    packed = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    codes = unpack_nibbles(packed, 2 * packed.numel())
    assert int(codes.max()) < 16
    assert torch.equal(pack_nibbles(codes, codes.numel()), packed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_blocks_follow_the_cuda_kernel(dtype: torch.dtype) -> None:
    """absmax 0 -> rcp = inf -> 0*inf = NaN -> code 0 for every element (NF4 0x00, dequant -0.0)."""
    x = torch.zeros(4, 64, dtype=dtype)
    q = bnbcli.quantize_4bit(x, "nf4")
    assert int(q.packed.max()) == 0 and float(q.absmax.abs().max()) == 0
    y = bnbcli.dequantize_4bit(q)
    assert bool((y == 0).all()) and bool(torch.signbit(y).all())
    b = bnbcli.quantize_blockwise8(x, 64)
    assert int(b.q.max()) == 0
    i = bnbcli.quantize_int8_rowwise(x)
    assert int(i.CB.abs().max()) == 0 and float(i.SCB.max()) == 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_constant_block_maps_to_plus_or_minus_one(quant_type: str) -> None:
    x = torch.full((128,), -3.0, dtype=torch.bfloat16)
    y = bnbcli.dequantize_4bit(bnbcli.quantize_4bit(x, quant_type))
    assert torch.equal(y, x)


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan"), 1e-40, -1e-42])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_do_not_crash(special: float, dtype: torch.dtype) -> None:
    x = torch.randn(3, 100).to(dtype)
    x[1, 7] = special
    x[2, :] = special  # a block (and a row) of nothing but the special value
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            q = bnbcli.quantize_4bit(x, quant_type, 64, dq)
            assert bnbcli.dequantize_4bit(q).shape == x.shape
    b = bnbcli.quantize_blockwise8(x, 64, nested=True)
    assert bnbcli.dequantize_blockwise8(b).shape == x.shape
    i = bnbcli.quantize_int8_rowwise(x, threshold=6.0)
    assert bnbcli.dequantize_int8_rowwise(i.CB, i.SCB).shape == x.shape


def test_inf_makes_the_rest_of_its_block_zero() -> None:
    """absmax = inf -> rcp = 0: finite values scale to 0 (NF4 code 7), inf*0 = NaN -> code 0."""
    x = torch.ones(64, dtype=torch.float32)
    x[0] = float("inf")
    q = bnbcli.quantize_4bit(x, "nf4")
    assert q.packed[0, 0] == 0x07 and bool((q.packed[1:] == 0x77).all())


def test_nan_gets_code_zero() -> None:
    x = torch.linspace(-1, 1, 64)
    x[10] = float("nan")
    q = bnbcli.quantize_4bit(x, "nf4")
    codes = unpack_nibbles(q.packed, 64)
    assert codes[10] == 0 and float(q.absmax[0]) == 1.0


def test_subnormals_flush_to_zero() -> None:
    """fp32 subnormals are read as 0 by the ftz kernel: a block of them is an all-zero block."""
    x = torch.full((64,), 1e-39, dtype=torch.float32)
    q = bnbcli.quantize_4bit(x, "fp4")
    assert float(q.absmax[0]) == 0 and int(q.packed.max()) == 0
