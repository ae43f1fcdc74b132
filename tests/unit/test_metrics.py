"""The round-trip error recorded in manifests: right, chunk-independent and thread-independent."""

from __future__ import annotations

import math

import pytest
import torch

from bnbcli.formats import fourbit, metrics


def test_roundtrip_error_matches_a_direct_float64_computation(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 37, generator=g).to(torch.bfloat16)
    y = (x.float() + 0.01 * torch.randn(x.shape, generator=g)).to(torch.bfloat16)
    dx, dd = x.double(), (x.double() - y.double())
    expected = metrics.RoundTripError(
        rmse=math.sqrt(float((dd * dd).mean())),
        max_abs=float(dd.abs().max()),
        rel_fro=math.sqrt(float((dd * dd).sum() / (dx * dx).sum())),
        sqnr_db=10 * math.log10(float((dx * dx).sum() / (dd * dd).sum())),
    )
    whole = metrics.roundtrip_error(x, y)
    monkeypatch.setattr(metrics, "CHUNK", 999)  # chunks that split rows
    monkeypatch.setattr(metrics, "SUM_BLOCK", 999)  # and blocks of the CPU sums that do, on two threads
    chunked = metrics.roundtrip_error(x, y)
    for got in (whole, chunked):
        for field in ("rmse", "max_abs", "rel_fro", "sqnr_db"):
            # float32 blocks, float64 across them: the "float32 with float64 accumulation"
            assert math.isclose(getattr(got, field), getattr(expected, field), rel_tol=1e-6), field


def test_squares_that_overflow_float32_are_summed_in_float64() -> None:
    x = torch.tensor([3e19, -2e20, 1.0], dtype=torch.float32)
    y = torch.tensor([0.0, -1e20, 1.0], dtype=torch.float32)
    sums = metrics.roundtrip_sums(x, y).tolist()
    dx, dd = x.double(), x.double() - y.double()
    assert math.isclose(sums[0], float((dx * dx).sum()), rel_tol=1e-12)
    assert math.isclose(sums[1], float((dd * dd).sum()), rel_tol=1e-12)
    assert sums[2] == float(dd.abs().max())
    [many] = metrics.roundtrip_sums_many([x], [y])
    assert torch.equal(many, metrics.roundtrip_sums(x, y))


def test_cpu_sums_do_not_depend_on_the_thread_count() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3_000_000, generator=g)
    y = x + 1e-3 * torch.randn(3_000_000, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = metrics.roundtrip_sums(x, y)
        torch.set_num_threads(max(2, before))
        many = metrics.roundtrip_sums(x, y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_nan_and_exact_round_trips() -> None:
    x = torch.tensor([1.0, float("nan"), 2.0])
    assert math.isnan(metrics.roundtrip_error(x, torch.tensor([1.0, 0.0, 2.0])).max_abs)
    far = torch.zeros(300_000)
    far[-1] = float("nan")  # in the last block of a tensor summed in several, on several threads
    assert math.isnan(metrics.roundtrip_error(far, torch.zeros(300_000)).max_abs)
    assert metrics._cpu_sums(torch.empty(0), torch.empty(0)).tolist() == [0.0, 0.0, 0.0]
    exact = metrics.roundtrip_error(torch.ones(4), torch.ones(4))
    assert exact.rmse == 0 and exact.sqnr_db == math.inf and exact.as_dict()["sqnr_db"] is None


def test_the_gpu_sums_give_the_cpu_figures(monkeypatch) -> None:
    """The GPU's chunked sums (run here on CPU tensors: the same torch calls), against the CPU's numpy
    sums: every figure to rounding, NaN kept, chunks that split the tensor unevenly, and an empty one."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10_007, generator=g).to(torch.bfloat16)
    y = (x.float() + 0.01 * torch.randn(x.shape, generator=g)).to(torch.bfloat16)
    monkeypatch.setattr(metrics, "CHUNK", 1000)
    for restored in (y, y.float()):  # int8's dequantized values come back as float32
        got, want = metrics._device_sums(x, restored), metrics._cpu_sums(x, restored)
        assert torch.allclose(got, want, rtol=1e-6, atol=0)  # float64 against float32 blocks
    x_nan = x.clone()
    x_nan[5003] = float("nan")
    assert math.isnan(float(metrics._device_sums(x_nan, y)[2]))
    empty = metrics._device_sums(torch.empty(0), torch.empty(0))
    assert empty.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    ("shape", "quant_type", "blocksize", "double_quant"),
    [
        ((7,), "nf4", 64, False),  # one partial block, an odd count
        ((33, 65), "fp4", 64, True),
        ((3, 1 << 18), "nf4", 256, True),  # three sum blocks, split between threads
        ((1000, 1001), "fp4", 4096, False),  # an odd count over several sum blocks
        ((2816, 1024), "nf4", 64, True),
    ],
)
def test_a_restorer_gives_the_figures_of_the_dequantized_weight(
    shape: tuple[int, ...], quant_type: str, blocksize: int, double_quant: bool, dtype: torch.dtype, special: bool
) -> None:
    """The CPU round trip of a 4-bit weight reads its values a block at a time (fourbit.restorer): the figures
    are those of the whole dequantized weight, exactly; with a NaN or an Inf in the weight, NaN where NaN."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    if special:
        x.view(-1)[-1] = float("nan") if x.numel() % 2 else float("inf")
    q = fourbit.quantize_4bit(x, quant_type, blocksize, double_quant)
    whole = metrics.roundtrip_sums(x, fourbit.dequantize_4bit(q))
    by_blocks = metrics.roundtrip_sums(x, fourbit.restorer(q))
    assert special or bool(torch.isfinite(whole).all())
    torch.testing.assert_close(by_blocks, whole, rtol=0, atol=0, equal_nan=True)
