"""The fast paths give the reference's bytes: code tables on every value they can see, chunked
quantization on adversarial tensors (zeros, subnormals, inf, NaN, fp16 overflow, odd tails, chunk edges)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnbcli.formats import blocks, blockwise8, fourbit, int8
from bnbcli.formats.blocks import CodeTable, quantize_blocks, reference_quantize_blocks
from bnbcli.formats.codes import DYNAMIC_CODE, FP4_THRESHOLDS, NF4_THRESHOLDS

TABLES = {
    "nf4": lambda: fourbit.code_table("nf4"),
    "fp4": lambda: fourbit.code_table("fp4"),
    "dynamic": blockwise8.code_table,
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _floats(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.uint32).view(np.float32))


@pytest.mark.parametrize("name", list(TABLES))
def test_code_table_equals_its_encoder_on_every_value_of_a_stepped_bucket(name: str) -> None:
    table: CodeTable = TABLES[name]()
    every = np.arange(1 << 16, dtype=np.uint32)
    buckets = np.arange(1 << 16, dtype=np.uint32)
    buckets = buckets[(buckets & 0x7F80) != 0x7F80]
    ends = _floats(np.concatenate((buckets << 16, (buckets << 16) | 0xFFFF)))
    stepped = np.unique(
        buckets[np.nonzero((table.encoder(ends) != table.encoder(ends.roll(-buckets.size))).numpy()[: buckets.size])[0]]
    )
    assert 0 < stepped.size <= 256
    for chunk in np.array_split(stepped, max(1, stepped.size // 32)):
        values = _floats(((chunk[:, None] << 16) | every[None, :]).reshape(-1))
        assert torch.equal(table.encode(values), table.encoder(values))


@pytest.mark.parametrize("name", list(TABLES))
def test_code_table_equals_its_encoder_near_thresholds_and_at_random(name: str) -> None:
    table: CodeTable = TABLES[name]()
    rng = np.random.default_rng(7)
    marks = np.concatenate((NF4_THRESHOLDS, FP4_THRESHOLDS, -FP4_THRESHOLDS, DYNAMIC_CODE, [1.0, -1.0, 0.0]))
    marks = marks.astype(np.float32).view(np.int32)
    near = (marks[:, None] + np.arange(-3, 4)[None, :]).reshape(-1).view(np.uint32)
    near = near[(near & 0x7F800000) != 0x7F800000]  # 0.0 - 1 ulp as an integer is a NaN
    finite_bits = rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    finite_bits = finite_bits[(finite_bits & 0x7F800000) != 0x7F800000]
    small = rng.standard_normal(500_000).astype(np.float32).view(np.uint32)
    tiny = np.array([0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x80800000], dtype=np.uint32)
    values = _floats(np.concatenate((near, finite_bits, small, tiny)))
    assert torch.equal(table.encode(values), table.encoder(values))


def _adversarial(n: int, dtype: torch.dtype, blocksize: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    nb = n // blocksize
    if nb >= 8:
        x[0:blocksize] = 0.0  # an all-zero block
        x[blocksize + 3] = 0.0  # one zero in an ordinary block
        x[2 * blocksize + 5] = float("nan")
        x[3 * blocksize + 1] = float("inf")
        x[4 * blocksize : 5 * blocksize] = float("nan")
        x[5 * blocksize : 6 * blocksize] *= 1e-36  # tiny absmax (fp16: all zero)
        x[6 * blocksize + 2] = -0.0
        x[7 * blocksize : 8 * blocksize] = -2.5  # constant block
    x = x.to(dtype)
    if dtype != torch.float16 and nb >= 12:
        sub = torch.tensor([1e-39, -1e-40, -1.2e-38, 2e-45], dtype=torch.float32).to(dtype)
        x[8 * blocksize : 8 * blocksize + 4] = sub  # subnormals among normal values
        x[9 * blocksize : 10 * blocksize] = sub.repeat(blocksize // 4)  # a block of nothing else
        x[10 * blocksize : 11 * blocksize] = (torch.randn(blocksize, generator=g) * 1e-37).to(dtype)
        x[10 * blocksize] = torch.tensor(-1e-39).to(dtype)  # subnormal in a block of absmax ~1e-37
        x[11 * blocksize : 12 * blocksize] = torch.tensor(float(np.finfo(np.float32).tiny)).to(dtype)
    if dtype == torch.float32 and nb >= 13:
        x[12 * blocksize] = 3.0e38  # absmax near FLT_MAX: its reciprocal is flushed to zero
    return x


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("pack", [False, True])
def test_quantize_blocks_equals_the_reference(
    name: str, dtype: torch.dtype, blocksize: int, pack: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blocks, "CHUNK_ELEMENTS", 4096)  # several chunks, and a partial last one
    table = TABLES[name]()
    for n in (13 * blocksize + 7, 13 * blocksize, 3 * blocksize + 1, blocksize - 1, 1):
        x = _adversarial(n, dtype, blocksize, seed=n)
        codes, absmax = quantize_blocks(x, blocksize, table, pack)
        ref_codes, ref_absmax = reference_quantize_blocks(x, blocksize, table.encoder, pack)
        assert torch.equal(codes, ref_codes), (n, "codes")
        assert torch.equal(absmax.view(torch.int32), ref_absmax.view(torch.int32)), (n, "absmax")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 300), (5, 1), (1, 5000), (3, 4, 129), (20000,)])
def test_int8_rows_equal_the_reference(
    dtype: torch.dtype, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blocks, "CHUNK_ELEMENTS", 2048)
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g)
    rows = x.view(-1, shape[-1])
    if rows.shape[0] >= 8:
        rows[0] = 0.0
        rows[1, 0] = float("nan")
        rows[2] = float("nan")
        rows[3, -1] = float("-inf")
        rows[4] *= 1e-6  # fp16 subnormals
        rows[5, 0] = 70000.0  # overflows fp16
        rows[6] = -0.0
        rows[7, :] = 1e-39
    x = x.to(dtype)
    fast = int8.quantize_int8_rowwise(x)
    ref = int8.reference_quantize_int8_rowwise(x)
    assert torch.equal(fast.CB, ref.CB)
    assert torch.equal(fast.SCB.view(torch.int32), ref.SCB.view(torch.int32))
    assert fast.outlier_cols is None and ref.outlier_cols is None


def test_bf16_to_fp16_through_float32_is_the_direct_cast_on_every_value() -> None:
    """int8's fast path casts bf16 to fp16 through float32 (which holds every bf16 exactly): the same bits
    as torch's direct cast, NaN payloads, infinities, subnormals and fp16 overflow included."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    direct = every.to(torch.float16)
    stepped = every.to(torch.float32).to(torch.float16)
    assert torch.equal(direct.view(torch.int16), stepped.view(torch.int16))


def test_int8_rows_of_every_bf16_value_equal_the_reference() -> None:
    """Every finite bf16 value in rows of 256 (each row with its own absmax), through the fast path."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    rows = every[torch.isfinite(every)].reshape(-1, 256)
    fast = int8.quantize_int8_rowwise(rows)
    ref = int8.reference_quantize_int8_rowwise(rows)
    assert torch.equal(fast.CB, ref.CB)
    assert torch.equal(fast.SCB.view(torch.int32), ref.SCB.view(torch.int32))


@pytest.mark.parametrize("name", list(TABLES))
def test_subnormal_products_encode_like_the_zeros_ftz_makes_of_them(name: str) -> None:
    """The fast path multiplies without flushing: a normal value far below its block's absmax can give a
    float32 subnormal product, which the kernel's ftz multiply turns into a signed zero. That is only
    harmless because every encoder maps each subnormal to the code of the zero of its sign."""
    table: CodeTable = TABLES[name]()
    magnitudes = np.concatenate((np.arange(1, 1 << 16), np.arange(0x7F0000, 0x800000)))  # low and high subnormals
    for sign in (0, 0x80000000):
        values = _floats(magnitudes | sign)
        zero = table.encoder(_floats(np.array([sign])))
        assert torch.equal(table.encoder(values), zero.expand(values.shape))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 4096 + 17])
@pytest.mark.parametrize("scale_kind", ["adversarial", "ordinary"])
def test_dequantize_by_block_table_equals_value_by_value(
    quant_type: str, dtype: torch.dtype, n: int, scale_kind: str
) -> None:
    """``dequantize_packed`` looks each code up in its block's 16 values; the reference multiplies every
    value (LUT[code] * scale, ftz, the GPU's NaN, the kernel's cast): the same bits, adversarial scales
    (NaN, ±inf, ±0, subnormal, huge) and codes included. Ordinary scales (every product normal, down to the
    bound) take the table's short way, one multiply and one cast."""
    from bnbcli.formats.blocks import expand_blocks, unpack_nibbles
    from bnbcli.formats.gpu_math import gpu_cast
    from bnbcli.formats.layout import num_blocks

    g = torch.Generator().manual_seed(n)
    blocksize = 64
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    nb = num_blocks(n, blocksize)
    special = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, 3e38, 1.0])
    scales = torch.randn(nb, generator=g).abs() * 10 ** torch.randint(-30, 30, (nb,), generator=g).float()
    _, lut = fourbit.code_tables(quant_type)
    if scale_kind == "adversarial":
        scales[: min(nb, special.numel())] = special[: min(nb, special.numel())]
    else:
        smallest_code = float(lut.abs()[lut != 0].min())
        scales[0] = 2 * float(np.finfo(np.float32).tiny) / smallest_code  # the bound itself
        scales[-1] = -scales[-1]
        assert fourbit._products_are_normal(scales, lut)
    expected = gpu_cast(expand_blocks(lut[unpack_nibbles(packed, n).long()], scales, blocksize), dtype)
    got = fourbit.dequantize_packed(packed, scales, n, quant_type, blocksize, dtype)
    assert got.dtype == dtype and got.shape == (n,)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
